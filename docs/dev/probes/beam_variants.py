"""Where the beam step's time goes: this tree's beam_search kernels beside copies with one part
cut out or changed, built in parallel and timed side by side in one process (median device time
per step, L2 flushed by a read, us), with torch's amax over the same logits as a read reference. The
variants are for timing only: their results are not used. Run on the device from the
repository root (PYTHONPATH=.): `python docs/dev/probes/beam_variants.py [name ...]`."""
import os, shutil, statistics, subprocess, sys, torch
from pathlib import Path

# four candidates blocks an SM: two bulk-copy stages each, launch bounds and slices for four
FOUR_AN_SM = [("slice_top_keys.cuh", "constexpr int kStages = 4;", "constexpr int kStages = 2;"),
              ("beam_search/beam_search.cuh", "__launch_bounds__(kThreads, 2) candidates_kernel",
               "__launch_bounds__(kThreads, 4) candidates_kernel"),
              ("beam_search/beam_search.cu", "const int64_t wanted = 2 * sms / rows;", "const int64_t wanted = 4 * sms / rows;")]

VARIANTS = {  # name: [(file under csrc, old text, new text)]
    "base": [],
    "old": [],  # another revision's csrc (prepare())
    "no_update": [("beam_search/beam_search.cuh", "  xllm::wait_for_prerequisite();\n", "  xllm::wait_for_prerequisite();\n  return;\n")],
    "no_stream": [("beam_search/beam_search.cuh", "  if (threadIdx.x == 0 && row == 0 && split == 0) *ws.step = *steps;\n",
                   "  if (threadIdx.x == 0 && row == 0 && split == 0) *ws.step = *steps;\n  if (vocab > 0) return;\n")],
    "no_unroll": [("slice_top_keys.cuh", "#pragma unroll 8  // independent shared loads: the loop is bound by their latency\n", ""),
                  ("slice_top_keys.cuh", "#pragma unroll 16  // independent shared loads: the loop is bound by their latency\n", ""),
                  ("beam_search/beam_search.cuh", "#pragma unroll 4  // independent shared loads: the loop is bound by their latency\n", "")],
    "stages5": [("slice_top_keys.cuh", "constexpr int kStages = 4;", "constexpr int kStages = 5;")],
    # three candidates blocks per SM (16 -> 24 warps; ptxas: 80 registers, 84 bytes spilled) with
    # three stages each, so that three fit the shared memory, and slices for three a SM
    "occ3": [("slice_top_keys.cuh", "constexpr int kStages = 4;", "constexpr int kStages = 3;"),
             ("beam_search/beam_search.cuh", "__launch_bounds__(kThreads, 2) candidates_kernel",
              "__launch_bounds__(kThreads, 3) candidates_kernel"),
             ("beam_search/beam_search.cu", "const int64_t wanted = 2 * sms / rows;", "const int64_t wanted = 3 * sms / rows;")],
    # four candidates blocks per SM (16 -> 32 warps, 64 registers: float32 spills 48 / 168 bytes) with two bulk-copy
    # stages each (so that four fit the shared memory) and slices for four a SM: float32 by bulk copies too (occ4), or
    # in registers one tile ahead (occ4reg)
    "occ4": [("slice_top_keys.cuh", "constexpr bool kBulk = BULK && sizeof(T) < 4, kRegisters = BULK && !kBulk;",
              "constexpr bool kBulk = BULK, kRegisters = false;")] + FOUR_AN_SM,
    "occ4reg": [("slice_top_keys.cuh", "constexpr int kAhead = 2;", "constexpr int kAhead = 1;")] + FOUR_AN_SM,
    "no_exp": [("slice_top_keys.cuh", "part[g] += fast_exp2(", "part[g] += (")],
    "clocks": None,  # see clocks()
    "no_append": [("slice_top_keys.cuh", "  if (!__any_sync(kFull, any)) return;", "  if (!__any_sync(kFull, any) || m != 12345.f) return;")],
    # fewer slices per row at small batches, so that a request's update ranks at most 512 / 1024 keys
    "keys512": [("beam_search/beam_search.cu", "const int64_t by_merge = bs::kCapacity / (beams * candidates);",
                 "const int64_t by_merge = 512 / (beams * candidates);")],
    "keys1024": [("beam_search/beam_search.cu", "const int64_t by_merge = bs::kCapacity / (beams * candidates);",
                  "const int64_t by_merge = 1024 / (beams * candidates);")],
}


def clocks(csrc: Path) -> None:
    """update_kernel's phases in block 0 (clock64 after the wait and after each barrier, printed at
    its end) and globaltimer: the last candidates block's end, block 0's wait release and end."""
    path = csrc / "beam_search" / "beam_search.cuh"
    lines = path.read_text().split("\n")
    start = next(i for i, l in enumerate(lines) if "update_kernel(" in l)
    out, n = [], 0
    for i, l in enumerate(lines):
        out.append(l)
        if i > start and l.strip() in ("__syncthreads();", "xllm::wait_for_prerequisite();", "if (step >= n_new) return;  // at max_length already: nothing to advance",
                                       "select_top(keys, &count, C, ranked, sel);"):
            out.append(f"  if (threadIdx.x == 0) t_[{n}] = clock64();")
            if n == 0:
                out.append("  if (threadIdx.x == 0) { unsigned long long g; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(g)); atomicMin(&g_dbg[1], g); if (b == 0) g_dbg[2] = g; }")
            n += 1
        if "if (b == 0) *st.steps = step + 1;" in l:
            out.append("    unsigned long long g; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(g));")
            out.append("    if (b == 0) { printf(\"update phases (cycles from the wait):\"); for (int j = 1; j < %d; ++j) printf(\" %%lld\", t_[j] - t_[0]);" % n)
            out.append("      printf(\"\\nglobaltimer ns: last candidates end -> first wait release %lld, -> block 0 release %lld, -> block 0 end %lld\\n\", (long long)(g_dbg[1] - g_dbg[0]), (long long)(g_dbg[2] - g_dbg[0]), (long long)(g - g_dbg[0])); g_dbg[1] = ~0ull; }")
    text = "\n".join(out)
    text = text.replace("struct Workspace {", "__device__ unsigned long long g_dbg[4] = {0, ~0ull, 0, 0};\nstruct Workspace {", 1)
    text = text.replace("  const int b = blockIdx.x, W = st.beams, C = st.candidates;\n", "  const int b = blockIdx.x, W = st.beams, C = st.candidates;\n  long long t_[16];\n", 1)
    text = text.replace("  if (threadIdx.x == 0) ws.partial[row * splits + split] = make_float2(p.max, p.sum);",
                        "  if (threadIdx.x == 0) ws.partial[row * splits + split] = make_float2(p.max, p.sum);\n"
                        "  if (threadIdx.x == 0) { unsigned long long g; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(g)); atomicMax(&g_dbg[0], g); }")
    assert text.count("g_dbg[0], g)") == 1
    path.write_text(text)


def prepare(name: str) -> Path:
    root = Path("probe") / f"beam_{name}"
    if os.environ.get("BEAM_PROBE_KEEP") and root.exists():  # prepared and built by an earlier call
        return root / "csrc"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree("csrc", root / "csrc")
    if name.startswith("old"):  # another revision's csrc, extracted into probe/old_csrc (git archive REV csrc)
        shutil.rmtree(root / "csrc")
        shutil.copytree("probe/old_csrc/csrc", root / "csrc")
    if name == "clocks":
        clocks(root / "csrc")
        return root / "csrc"
    for file, old, new in VARIANTS[name]:
        path = root / "csrc" / file
        text = path.read_text()
        assert text.count(old) == 1, (name, old)
        path.write_text(text.replace(old, new))
    return root / "csrc"


def build(name: str):
    from torch.utils import cpp_extension
    from xllm_sampling import kernels
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    csrc = Path("probe") / f"beam_{name}" / "csrc"
    return cpp_extension.load(name=f"beam_probe_{name}", sources=[str(csrc / "beam_search" / "beam_search.cu")],
                              extra_include_paths=[str(csrc.resolve())] + kernels.extra_include_paths(),
                              extra_cflags=["-O3"], extra_cuda_cflags=kernels.NVCC_FLAGS,
                              build_directory=str(Path("probe") / f"build_{name}"))


def main(names):
    if len(names) == 1 and os.environ.get("BEAM_PROBE_BUILD"):
        build(names[0])
        return
    for n in names:
        prepare(n)
        (Path("probe") / f"build_{n}").mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, n], env=os.environ | {"BEAM_PROBE_BUILD": "1"}) for n in names]
    assert all(p.wait() == 0 for p in procs)
    mods = {n: build(n) for n in names}
    from xllm_sampling.ops.beam_search import BeamSearchState, num_candidates
    # read, not written, before each call (as gate.Timer: a written flush leaves dirty lines the timed call writes back)
    flush = torch.ones(2 * torch.cuda.get_device_properties(0).L2_cache_size // 4, device="cuda")

    def time_us(f, reps=40):
        f(); torch.cuda.synchronize(); ts = []
        for _ in range(reps):
            flush.sum(); torch.cuda._sleep(1_000_000)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); f(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1e3)
        return statistics.median(ts)

    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "us, median of 40, L2 flushed by a read")
    print(f"{'B':>3s} {'W':>2s} {'V':>7s} {'dtype':>8s} {'amax':>7s} " + " ".join(f"{n:>10s}" for n in names))
    shapes = ((64, 4, 151936, torch.float32), (64, 4, 151936, torch.bfloat16), (64, 4, 32000, torch.float32),
                           (1, 4, 151936, torch.float32), (64, 8, 151936, torch.float32), (16, 4, 151936, torch.float32),
              (4, 4, 32000, torch.float32), (4, 4, 151936, torch.float32), (1, 8, 151936, torch.float32))
    for b, w, v, dtype in shapes[:int(os.environ.get("BEAM_PROBE_SHAPES", len(shapes)))]:
        g = torch.Generator("cuda").manual_seed(b * w + v)
        x = (torch.randn(b * w, v, device="cuda", generator=g) * 3).to(dtype)
        row = [time_us(lambda: x.amax(-1))]
        for n in names:
            st = BeamSearchState.start(b, w, 1, 1 + 10_000, eos=2, device="cuda")
            st.running_scores.copy_(-torch.rand(b, w, generator=torch.Generator().manual_seed(0)) * 10)
            args = lambda: (x, st.eos_ids, st.steps, st.running_scores, st.history_tokens, st.history_parents,  # noqa: E731
                            st.pool_scores, st.pool_finished, st.pool_step, st.pool_parent, st.pool_token, st.improvable,
                            st.all_hit, w, num_candidates(st), st.prompt_len, st.max_length, st.length_penalty, 0)
            row.append(time_us(lambda: mods[n].beam_step(*args())))
        print(f"{b:3d} {w:2d} {v:7d} {str(dtype)[6:]:>8s} " + " ".join(f"{t:10.1f}" for t in row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(VARIANTS))
