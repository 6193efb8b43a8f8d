"""`xllm-port bench ARGS...` with FlashInfer's top-k module loaded from the objects that
../shared/tools/flashinfer-topk-objects.sh compiled (linked by .ci/gpu into /tmp/fitopk/topk.so)
instead of its 8-minute JIT build, which every bench whose FlashInfer calls reach top-k would
otherwise start (FlashInfer's sampling from logits with a top-k among them). Without that file,
FlashInfer is left as it is.
Usage (device machine, repository root): python3 .ci/fi_prebuilt_bench.py --host --batch 1
Probes import use_prebuilt_topk from here (sys.path: .ci)."""
import sys
from pathlib import Path

PREBUILT = Path("/tmp/fitopk/topk.so")


def use_prebuilt_topk() -> bool:
    """Make FlashInfer load its top-k module from PREBUILT; whether it will (FlashInfer imports
    and the file exists)."""
    if not PREBUILT.exists():
        return False
    try:
        import flashinfer.topk as fi_topk
    except ImportError:
        return False
    make_module = fi_topk.gen_topk_module

    class Prebuilt:
        """What gen_topk_module returns, loading the prebuilt library instead of building it."""

        def build_and_load(self):
            return make_module().load(PREBUILT)

    fi_topk.gen_topk_module = Prebuilt
    return True


if __name__ == "__main__":
    use_prebuilt_topk()
    from xllm_sampling.port.cli import main

    sys.argv = ["xllm-port", "bench", *sys.argv[1:]]
    main()
