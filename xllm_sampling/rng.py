"""Counter-based random numbers (Philox-4x32-10) keyed by request seed and position, in torch.

A request's draw depends on (seed, position, stream) only, never on the row it occupies in a
batch, so the same request samples the same tokens whatever batch it is scheduled in. The CUDA
kernels use the same generator, so both paths draw the same numbers.
"""
from __future__ import annotations

import torch

from . import kernels

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit halves of a * b for 32-bit a (int64 tensor or Python int) and constant b, without overflow."""
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    hi = ((p_lo >> 16) + p_hi) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32(counter: tuple, key: tuple, rounds: int = 10):
    """Philox-4x32 on int64 tensors (or Python integers) holding 32-bit words: four counter words, two key words."""
    c0, c1, c2, c3 = (c & _MASK32 for c in counter)
    k0, k1 = (k & _MASK32 for k in key)
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


PYTHON_MAX_ROWS = 64  # on CPU, up to this many keys go through uniform_python (fewer, larger torch ops beyond)


def uniform(seed: torch.Tensor, position: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """One float64 uniform in [0, 1) per element of ``seed``/``position`` (int64 tensors, same shape).

    On a GPU one launch of the sampler extension computes it; elsewhere (or without a compiler)
    the same bits come from the torch implementation below, or for a few keys on the CPU from
    plain Python integers (about 160 tiny torch operations cost more than a few rows of them).
    """
    kernel = kernels.load("sampler") if seed.is_cuda else None
    if kernel is not None:
        return kernel.uniform(seed.contiguous(), position.contiguous(), stream)
    if seed.device.type == "cpu" and seed.numel() <= PYTHON_MAX_ROWS:
        values = [uniform_python(s, p, stream) for s, p in zip(seed.flatten().tolist(), position.flatten().tolist())]
        return torch.tensor(values, dtype=torch.float64).reshape(seed.shape)
    return uniform_torch(seed, position, stream)


def uniform_python(seed: int, position: int, stream: int = 0) -> float:
    """:func:`uniform_torch` for one key, on Python integers (philox4x32 takes them as well)."""
    x0, x1, _, _ = philox4x32((position, position >> 32, stream, 0), (seed, seed >> 32))
    return (((x0 >> 5) << 26) | (x1 >> 6)) * (1.0 / (1 << 53))


def uniform_torch(seed: torch.Tensor, position: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """:func:`uniform` in plain torch operations (the reference the CUDA kernel must match bit for bit)."""
    zero = torch.zeros_like(position)
    x0, x1, _, _ = philox4x32(
        (position, position >> 32, zero + stream, zero), (seed, seed >> 32)
    )
    # 53 random bits: 27 from the first word, 26 from the second.
    bits = ((x0 >> 5) << 26) | (x1 >> 6)
    return bits.to(torch.float64) * (1.0 / (1 << 53))
