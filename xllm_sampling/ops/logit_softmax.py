"""Step 1, ``logit_softmax``: temperature-scaled softmax (or log-softmax) of logits in one pass."""
from __future__ import annotations

import torch

from .. import _checks, flags, kernels, nvtx


def _temperature(temperature, logits: torch.Tensor) -> torch.Tensor | float | None:
    """The checked temperature: None, a Python float, or a float32 (batch,) tensor on the logits' device."""
    if temperature is None:
        return None
    if not isinstance(temperature, torch.Tensor):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature: expected a number or a tensor, got {type(temperature).__name__}")
        _checks.number_in("temperature", temperature, 0.0)
        return float(temperature)
    t = _checks.per_row("temperature", temperature, logits.shape[0], logits.device, torch.float32)
    _checks.values_in("temperature", t, 0.0, float("inf"), lo_open=False, hi_open=False)
    return t


def _per_row_ones_for_zero(t, logits: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.full((logits.shape[0],), t, dtype=torch.float32, device=logits.device)
    return torch.where(t == 0, torch.ones_like(t), t)


def original(logits: torch.Tensor, temperature, log: bool = False) -> torch.Tensor:
    """The engine's original path: ``torch.softmax(logits.float() / t, -1)``, t = 0 read as 1."""
    temperature = _per_row_ones_for_zero(temperature, logits)
    x = logits.float()
    if temperature is not None:
        x = x / temperature[:, None]
    return torch.log_softmax(x, -1) if log else torch.softmax(x, -1)


def logit_softmax(logits: torch.Tensor, temperature=None, *, log: bool = False, out: torch.Tensor | None = None):
    """Softmax (or log-softmax with ``log=True``) of ``logits / temperature`` over the last dim, in float32.

    Args:
        logits: (batch, vocab) float32, bfloat16 or float16.
        temperature: None, a number, or a (batch,) float tensor on the logits' device. 0 is read as 1.
            Negative or NaN values are a ValueError when they can be checked without a host
            synchronisation (numbers, CPU tensors); on a GPU tensor they are not checked.
        log: return log-softmax instead of softmax.
        out: optional contiguous (batch, vocab) float32 tensor to write into.

    -inf logits get probability 0; a row of all -inf, or with a NaN, gives NaN in every entry,
    as ``torch.softmax`` does. Flag ``logit_softmax`` off: the original torch path.
    """
    on, ranges = flags.values(_FLAGS)
    kernel = kernels.load("logit_softmax") if on and type(logits) is torch.Tensor and logits.is_cuda else None
    if kernel is None or out is not None:
        return _checked_call(kernel, logits, temperature, log, out, ranges)
    # The common GPU call, checked with as few Python operations as a batch-1 call affords (the
    # rest, and every problem's message, is _checked_call's).
    if logits.dim() != 2 or logits.dtype not in _checks.FLOAT_DTYPES or not logits.numel():
        _checks.logits_2d("logits", logits)
    if (type(temperature) is torch.Tensor and temperature.is_cuda and temperature.dtype is torch.float32
            and temperature.shape == logits.shape[:1] and temperature.device == logits.device):
        tensor, scalar = temperature, 1.0  # what the kernel takes; a GPU tensor's values are never read (no sync)
    else:
        tensor, scalar = _kernel_temperature(_temperature(temperature, logits))
    with nvtx.range_if(ranges, "logit_softmax"):
        return kernel.logit_softmax(logits.contiguous(), tensor, scalar, log, None)


_FLAGS = ("logit_softmax", "nvtx")  # what a call reads: its step's flag and whether to open an NVTX range


def _checked_call(kernel, logits, temperature, log: bool, out, ranges: bool) -> torch.Tensor:
    """:func:`logit_softmax` with every argument checked: through ``kernel`` (None: the torch path,
    :func:`original`)."""
    _checks.logits_2d("logits", logits)
    t = _temperature(temperature, logits)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != logits.shape or out.dtype != torch.float32:
            raise ValueError(f"out: expected a float32 tensor of shape {tuple(logits.shape)}")
        if out.device != logits.device or not out.is_contiguous():
            raise ValueError(f"out: must be contiguous and on {logits.device}")
    with nvtx.range_if(ranges, "logit_softmax"):
        if kernel is None:
            result = original(logits, t, log)
            return result if out is None else out.copy_(result)
        return kernel.logit_softmax(logits.contiguous(), *_kernel_temperature(t), log, out)


def _kernel_temperature(t) -> tuple[torch.Tensor | None, float]:
    """The kernel's (per-row tensor or None, scalar) of a checked temperature."""
    return (t.contiguous(), 1.0) if isinstance(t, torch.Tensor) else (None, 1.0 if t is None else t)
