"""Input checks shared by the ops: each failure is a ValueError naming the argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def logits_2d(name: str, x, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Check that ``x`` is a non-empty 2-D tensor of one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (batch, vocab), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {x.dtype} not supported; expected one of {', '.join(map(str, dtypes))}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(x.shape)}")
    return x


def per_row(name: str, value, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """A per-row parameter given as None, a Python number or a (batch,) tensor on ``device``, as a tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name}: expected shape ({batch},) to match the batch, got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: on {value.device} but logits are on {device}")
        if value.dtype.is_floating_point != dtype.is_floating_point:
            raise ValueError(f"{name}: dtype {value.dtype} where a {'float' if dtype.is_floating_point else 'integer'} is expected")
        return value.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number or a tensor, got {type(value).__name__}")
    if not dtype.is_floating_point:
        value = int64(name, value)
    return torch.full((batch,), value, dtype=dtype, device=device)


def int64(name: str, value) -> int:
    """A Python number (not a bool) that is an integer fitting int64, as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number or a tensor, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if not -(2 ** 63) <= value < 2 ** 63:
        raise ValueError(f"{name}: {value} does not fit in int64 [-2**63, 2**63)")
    return int(value)


def values_in(name: str, t: torch.Tensor | None, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    """Check the values of a CPU tensor lie in the interval; device tensors are not read (no host sync)."""
    if t is None or t.device.type != "cpu" or t.numel() == 0:
        return
    if not t.dtype.is_floating_point and lo == -math.inf and hi == math.inf:
        return  # an integer tensor has no value outside (-inf, inf)
    least, most = (v.item() for v in torch.aminmax(t))  # NaN propagates into both
    if (lo < least if lo_open else lo <= least) and (most < hi if hi_open else most <= hi):
        return  # one reduction: the check costs a host tensor a few microseconds, not ten
    bad = torch.isnan(t) if t.dtype.is_floating_point else torch.zeros_like(t, dtype=torch.bool)
    bad |= (t <= lo) if lo_open else (t < lo)
    bad |= (t >= hi) if hi_open else (t > hi)
    if bool(bad.any()):
        first = t[bad][0].item()
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: value {first} outside {interval}")


def number_in(name: str, value, lo: float, hi: float = math.inf) -> None:
    """Check a Python number (not a tensor) is finite-or-inf within [lo, hi]."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value) or not lo <= value <= hi:
            raise ValueError(f"{name}: value {value} outside [{lo}, {hi}]")
