"""Phase clocks of the caching sampling kernel (sample_kernel) at batch 1: an instrumented copy of
sampling.cuh (thread 0 of block 0 records clock64 at phase boundaries and printf's the deltas), built as
its own extension. Run on the device from the repository root (PYTHONPATH=.); clocks inflate a little."""
import hashlib, os, sys, pathlib, torch
from torch.utils import cpp_extension
from xllm_sampling import kernels
from xllm_sampling.paths import CSRC_DIR
inc_root = pathlib.Path("/tmp/pinc") / hashlib.sha1(str(CSRC_DIR).encode()).hexdigest()[:8]  # one per tree: trees may run side by side
inc = inc_root / "sampler"; inc.mkdir(parents=True, exist_ok=True)
s = (CSRC_DIR / "sampler/sampling.cuh").read_text()
def at(anchor, text, before=True):
    global s
    assert s.count(anchor) == 1, anchor
    s = s.replace(anchor, text + anchor if before else anchor + text)
at("  // Cache the chunk as float32", "  long long ph[12] = {}; int ph_rounds = 0;\n#define PH(n) if (tid == 0) ph[n] = clock64()\n  PH(0);\n")
at("  // Exchanges alternate", "  PH(1);\n")
at("  const float row_max = sh.max;", "  PH(2);\n")
at("  // 2. S = sum of w;", "  PH(3);\n")
at("  bool done = invalid || greedy;", "  PH(4);\n")
at("  auto in_top_k = [&]", "  PH(5);\n")
at("  // 4-5. Draw;", "  PH(6);\n")
at("    token = sh.chosen_index;", "    ++ph_rounds;\n")
at("  if (!accepted) {", "  PH(7);\n")
# the whole line, printed where a row ends: after the last exchange, or where block 0 of a listed row returns
PRINT = "  if (row == 0 && rank == 0 && tid == 0) printf(\"PH rounds %d | load %lld max %lld tiles %lld mass+levels %lld topk_cut %lld (bound %lld gather %lld listed %lld: list %lld k %lld rank %lld draw %lld) cand_mass %lld draw %lld tail %lld\\n\", ph_rounds, ph[1]-ph[0], ph[2]-ph[1], ph[3]-ph[2], ph[4]-ph[3], ph[5]-ph[4], ph[10]-ph[4], ph[11]-ph[10], ph[5]-ph[11], ph_list[0], ph_list[1], ph_list[2], ph_list[3], ph[6]-ph[5], ph[7]-ph[6], ph[8]-ph[7]);\n"
at("  cluster.sync();  // no block leaves", "  PH(8);\n" + PRINT)
# Block 0's ranking and draw of a listed row, kept for the final printf (a printf of their own
# there would be timed as part of the cut).
at("namespace xllm::sampler {\n", "static __device__ long long ph_list[4];\n", before=False)
at("    int total = top_k_bound(cluster, k, row_max, c, -1, sh);\n", "    PH(10);\n", before=False)
at("      if (rank != 0) return;\n      draw_listed(", "      PH(11);\n")
at("row_max, row_sum, a.tokens + row, a.logprobs + row);\n",
   "      PH(5); PH(6); PH(7); PH(8);\n" + PRINT.replace("  if", "      if"), before=False)
at("  if (alone) {\n    slice::rank_select", "  long long d0 = clock64();\n")
at("  const int r = draw_ranked(", "  long long d1 = clock64();\n")
at("  if (threadIdx.x == 0) {\n    const uint64_t key = ", "  long long d2 = clock64();\n  if (threadIdx.x == 0) { ph_list[0] = total; ph_list[1] = k; ph_list[2] = d1 - d0; ph_list[3] = d2 - d1; }\n")
if not (inc / "sampling.cuh").exists() or (inc / "sampling.cuh").read_text() != s:  # unchanged: no rebuild
    (inc / "sampling.cuh").write_text(s)
os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
mod = cpp_extension.load(name="xllm_sampling_sampler_ph", sources=[str(p) for p in kernels.sources("sampler")],
                         extra_include_paths=[str(inc_root), str(CSRC_DIR)] + kernels.extra_include_paths(),
                         extra_cflags=["-O3"], extra_cuda_cflags=kernels.NVCC_FLAGS, verbose=False)
if os.environ.get("PHASE_BUILD_ONLY"):  # build now (in parallel with other builds), run later
    sys.exit(0)
pos = torch.zeros(1, dtype=torch.int64, device="cuda")
cfgs = {"top-p 0.9": (0, 0.9, 0.0, 0.8), "top-k 1": (1, 1.0, 0.0, 0.8), "top-k 50": (50, 1.0, 0.0, 0.8),
        "top-k 50 + top-p 0.9": (50, 0.9, 0.0, 0.8), "top-k 50 t=1.5": (50, 1.0, 0.0, 1.5), "top-k 50 t=0.3": (50, 1.0, 0.0, 0.3)}
for V in (32000, 151936):
    # PHASE_SEED=v: the rows of side_by_side.py and sampler_variants.py at B=1 (seed 1 + V)
    seed = 1 + V if os.environ.get("PHASE_SEED") == "v" else int(os.environ.get("PHASE_SEED", 0))
    x = torch.randn(1, V, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)) * 3
    for name, (k, p, mp, t) in cfgs.items():
        for rep in range(3):
            mod.sample(x, None, t, None, k, None, p, None, mp, None, 1, None, 5, None, None, 0.0, None, 0.0, None, 1.0)
            torch.cuda.synchronize()
        print(f"^ V={V} {name} (cycles, last of 3 calls)", flush=True)
