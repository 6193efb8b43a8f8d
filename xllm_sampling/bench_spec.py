"""``xllm-port bench --spec``: speculative decoding's rejection sampler at each level, against K.

For K draft tokens per request, batch B and vocabulary V: the target's logits (B, K + 1, V), the
draft's distributions (B, K, V) and draft tokens sampled from them; temperature 1, no filters (the
settings FlashInfer's call has). Levels: ``loop``, ``compiled`` and ``kernel`` (``rejection_sample``'s), and
FlashInfer's ``chain_speculative_sampling`` when it imports, timed with the softmax that turns the
target's logits into the probabilities it takes. Each call is timed whole, host included (a loop
over K pays its launches), median of ``reps``, L2 flushed; on a GPU also its device time alone (a
spin kernel queued ahead hides the host) and, from the torch profiler, the kernel launches of one
call, which a one-launch kernel keeps constant in K.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from . import gate
from .ops.spec_decode import rejection_sample

LEVELS = ("loop", "compiled", "kernel", "flashinfer")


def _inputs(batch: int, k: int, vocab: int, device: str):
    g = torch.Generator(device).manual_seed(k)
    logits = torch.randn(batch, k + 1, vocab, device=device, generator=g) * 3
    probs = torch.softmax(torch.randn(batch, k, vocab, device=device, generator=g) * 3, -1)
    drafts = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(batch, k)
    return logits, probs, drafts


def _call(level: str, fi, logits, probs, drafts) -> Callable[[], object] | None:
    batch = logits.shape[0]
    seed = torch.arange(batch, device=logits.device)
    if level == "flashinfer":
        if fi is None:
            return None
        return lambda: fi.sampling.chain_speculative_sampling(probs, drafts.int(), torch.softmax(logits, -1))
    if level == "kernel" and not logits.is_cuda:
        return None
    return lambda: rejection_sample(logits, drafts, draft_probs=probs, seed=seed, level=level)


def _launches(fn: Callable[[], object]) -> int:
    """Kernel launches of one call of ``fn`` (CUDA), from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def run(ks, batches, vocab: int, reps: int, levels, progress: Callable[[str], None]) -> dict:
    """Every level at every (K, batch): microseconds per call and, on a GPU, kernel launches per call."""
    device = gate.device_kind()
    fi = None
    if device == "cuda" and "flashinfer" in levels:
        try:
            import flashinfer as fi
        except ImportError:
            fi = None
    timer = gate.Timer(device, host_overhead=True)
    device_timer = gate.Timer(device, host_overhead=False) if device == "cuda" else None
    header = gate.environment() | {"vocab": vocab, "flashinfer": getattr(fi, "__version__", "not installed")}
    rows = []
    failed: dict[str, dict] = {}  # a level torch.compile could not build: not tried again (each try takes a minute)
    for batch in batches:
        for k in ks:
            logits, probs, drafts = _inputs(batch, k, vocab, device)
            row = {"k": k, "batch": batch}
            for level in levels:
                fn = _call(level, fi, logits, probs, drafts)
                if fn is None or level in failed:
                    row[level] = failed.get(level)
                    continue
                try:
                    fn(), fn()  # warm up (and compile)
                except torch._dynamo.exc.BackendCompilerFailed as e:  # inductor's errors: reported, not fatal
                    row[level] = failed[level] = {
                        "error": f"{type(getattr(e, 'inner_exception', e)).__name__} in torch.compile"}
                    progress(f"spec_decode K={k} B={batch} {level}: {str(e).strip().splitlines()[0][:200]}; "
                             "not tried again")
                    continue
                row[level] = {"us": statistics.median(timer(fn) for _ in range(reps)),
                              "device_us": statistics.median(device_timer(fn) for _ in range(reps)) if device_timer else None,
                              "launches": _launches(fn) if device == "cuda" else None}
            rows.append(row)
            progress(f"[{len(rows)}/{len(ks) * len(batches)}] spec_decode K={k} B={batch}")
    return {"header": header, "levels": list(levels), "spec": rows}


def table(report: dict) -> str:
    """One line per (batch, K): each level's microseconds per call, host included / device alone (kernel launches)."""
    h, levels = report["header"], report["levels"]
    lines = [f"# rejection sampling, V={h['vocab']}; {h.get('gpu', 'CPU (no launch counts)')}; torch {h['torch']}; "
             f"FlashInfer {h['flashinfer']}; us per call, host included / device alone (kernel launches)",
             f"{'B':>4} {'K':>3}" + "".join(f"{level:>26}" for level in levels)]
    for r in report["spec"]:
        cells = []
        for level in levels:
            c = r[level]
            if c is None or "error" in c:
                cells.append(f"{'n/a' if c is None else 'compile error':>26}")
            else:
                text = f"{c['us']:.1f}" + ("" if c.get("device_us") is None else f" / {c['device_us']:.1f}") \
                    + ("" if c["launches"] is None else f" ({c['launches']})")
                cells.append(f"{text:>26}")
        lines.append(f"{r['batch']:>4} {r['k']:>3}" + "".join(cells))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Time against K, one line per level, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in report["spec"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in report["spec"] if r["batch"] == batch]
        for level in report["levels"]:
            points = [(r["k"], r[level]["us"]) for r in rows if r[level] is not None and "us" in r[level]]
            if points:
                ax.plot(*zip(*points), "o-", label=level)
        ax.set(title=f"rejection sampling, B={batch}, V={report['header']['vocab']}", xlabel="K (draft tokens)",
               ylabel="us per call", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
