"""Error bounds of float32 arithmetic, for parity tests that compare against a float64 reference.

Each bound is derived from the arithmetic it bounds, not tuned to one machine: torch's float32
results differ between CPUs (ATen picks default, AVX2 or AVX-512 kernels, which sum in 8 or 16
lanes) and thread counts, so a test tolerance must hold for every summation order torch may use.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 3-4; Higham and
Mary, "A New Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 2019):
every float32 operation returns the exact result times (1 + d), |d| <= u = 2**-24. A sum of n
non-negative terms whose longest chain of dependent additions is m has a relative error of at
most m*u in the worst case, and at most lambda*sqrt(m)*u with probability at least
1 - 2*exp(-lambda**2 / 2) when the rounding errors are independent with mean zero. With lambda
= 6 that probability is 1 - 3e-8 per sum, so a test of a few thousand sums fails by chance less
than once in 10,000 runs, while an algorithmic error (a missed term, a wrong scale) still shows.
"""
from __future__ import annotations

import math

U = 2.0 ** -24  # unit roundoff of float32
LAMBDA = 6.0  # probabilistic bounds hold with probability >= 1 - 2 exp(-LAMBDA**2 / 2) = 1 - 3e-8
TORCH_CPU_LANES = 8  # the fewest accumulators an ATen CPU reduction uses (default and AVX2: 8 floats)
SMALLEST_NORMAL = 2.0 ** -126  # below it float32 spacing is absolute (2**-149): no relative bound


def chain_length(n: int, lanes: int) -> int:
    """Longest chain of dependent additions when n terms are summed in ``lanes`` sequential
    accumulators that are then combined pairwise."""
    return math.ceil(n / lanes) + math.ceil(math.log2(max(lanes, 1)))


def sum_relative_error(n: int, lanes: int = TORCH_CPU_LANES) -> float:
    """Relative error of a float32 sum of ``n`` non-negative terms (probabilistic bound, lambda = 6)."""
    return LAMBDA * math.sqrt(chain_length(n, lanes)) * U


def exp_relative_error(max_abs_argument: float, ulps: float = 4.0) -> float:
    """Relative error of exp(a) for a float32 argument ``a`` computed with an error of about two ulps
    of ``max_abs_argument`` (x / t rounded, then x / t - max rounded): the exponent's absolute error
    is exp's relative error, plus the ``ulps`` of the exp routine itself (CUDA's expf: 2; Sleef's
    u10: 1; glibc: < 1; 4 leaves room for an exp2 with a scaled argument)."""
    return (2.0 * max_abs_argument + ulps) * U


def softmax_relative_error(n: int, max_abs_argument: float, lanes: int = TORCH_CPU_LANES) -> float:
    """Relative error of each probability of a float32 softmax over ``n`` entries whose scaled
    logits are at most ``max_abs_argument`` in magnitude: its normaliser's sum, its own exp, the
    division (half an ulp)."""
    return sum_relative_error(n, lanes) + exp_relative_error(max_abs_argument) + 0.5 * U


def log_softmax_absolute_error(n: int, max_abs_argument: float, max_abs_result: float,
                               lanes: int = TORCH_CPU_LANES) -> float:
    """Absolute error of a float32 log-softmax entry: the log of the normaliser carries its
    relative error as an absolute one; the subtractions round at the magnitude of their operands."""
    return softmax_relative_error(n, max_abs_argument, lanes) + 2.0 * (max_abs_argument + max_abs_result) * U
