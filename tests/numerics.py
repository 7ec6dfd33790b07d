"""Tolerances for comparing two fp32 evaluations of the same maths (other kernels, batch sizes, weight
layouts, torch or transformers releases), derived from rounding instead of read off one machine.

Derivation. eps = 2**-23 is fp32's machine epsilon (unit roundoff u = eps / 2). A reduction of K terms
(a dot product, a row of a matmul, a softmax or norm denominator) summed in any order carries a rounding
error of at most gamma_K * sum|terms| with gamma_K ~ K * u (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., sec. 3.1). Individual roundings are nearly independent, so the error actually met
grows like a random walk, ~ sqrt(K) * u * sum|terms| (Higham's rule of thumb, sec. 3.6). Two kernels each
make such an error, in opposite directions at worst: 2 * sqrt(K) * u = sqrt(K) * eps. In the networks
compared here every block ends in a normalisation or a residual sum, so sum|terms| stays at the scale of
the compared values (|values|, the largest magnitude of the reference) up to the network's gain, and the
error made by each of `depth` chained reductions is carried to the output with a gain of about one; the
errors add up:

    |a - b| <~ depth * sqrt(K) * eps * |values|          (K: the longest reduction in the chain)

`SAFETY` covers what the estimate leaves out: sum|terms| exceeding |result| through cancellation, the
gains of the random tiny networks, and the tails of the random walk. Even with it the tolerance is
around 1e-4 relative for the networks here, while a real mistake (a wrong mask, weight, position,
scale or token) moves outputs by 1e-2 to 1 relative.
"""
import math

import torch

EPS32 = torch.finfo(torch.float32).eps
SAFETY = 8.0


def fp32_tolerance(depth: int, reduction: int, magnitude: float) -> float:
    """Absolute tolerance for two fp32 evaluations of a chain of `depth` reductions of length at most
    `reduction` whose values are of size `magnitude` (see the module docstring)."""
    return SAFETY * depth * math.sqrt(reduction) * EPS32 * float(magnitude)


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, depth: int, reduction: int) -> None:
    """actual == expected up to fp32 rounding of the chain (shapes equal, no NaN, within the tolerance)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    tol = fp32_tolerance(depth, reduction, expected.abs().max())
    diff = float((actual.float() - expected.float()).abs().max())
    assert diff <= tol, f"max |difference| {diff:.3g} > fp32 tolerance {tol:.3g} (depth {depth}, K {reduction})"
