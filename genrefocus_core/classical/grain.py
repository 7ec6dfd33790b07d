"""Grain matched to the sharp region: blurring averages a photo's sensor noise or film grain away, so
blurred areas look plastic next to the sharp ones. This measures the noise of the part that stays
sharp and adds the same noise, seeded, where the image was blurred."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..basics.defocus import IN_FOCUS_RADIUS
from ..basics.errors import InputError

# A 3x3 mean removed from white noise leaves 8/9 of its variance: (1 - 1/9)^2 + 8 (1/9)^2.
_RESIDUAL_VARIANCE = 8.0 / 9.0


def _residual(image: torch.Tensor) -> torch.Tensor:
    """[B,H,W,3] minus its 3x3 mean (replicated borders): the image's finest detail and its noise."""
    x = image.permute(0, 3, 1, 2)
    mean = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x - mean).permute(0, 2, 3, 1)


def grain_covariance(image: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
    """3x3 colour covariance of the noise of `image` [B,H,W,3] in the pixels `sharp` [B,H,W] (all when
    none), robust to the edges and texture there: per-channel strength from the median absolute
    deviation (1.4826 MAD = sigma for Gaussian noise), the colour correlation from the pixels within
    3 sigma in every channel."""
    res = _residual(image.float())
    sel = sharp.bool()
    if not bool(sel.any()):
        sel = torch.ones_like(sel)
    r = res[sel].double()  # [N,3]
    r = r - r.median(0).values
    sigma = 1.4826 * r.abs().median(0).values / math.sqrt(_RESIDUAL_VARIANCE)
    core = r[(r.abs() <= 3 * sigma * math.sqrt(_RESIDUAL_VARIANCE) + 1e-12).all(-1)]
    if core.shape[0] < 3:
        return torch.diag(sigma * sigma)
    cov = core.T @ core
    d = cov.diagonal().clamp_min(1e-30).sqrt()
    corr = cov / (d[:, None] * d[None, :])
    return corr * sigma[:, None] * sigma[None, :]


def add_matched_grain(rendered, original, radius, amount: float, seed: int = 0) -> torch.Tensor:
    """`rendered` [B,H,W,3] in [0,1] with the noise of `original`'s sharp region (blur radius `radius`
    [B,H,W] below IN_FOCUS_RADIUS) added where it was blurred, fading in over the first pixel of blur
    radius; `amount` scales it (0 = off, 1 = matched). Same seed, same grain."""
    amount = float(amount)
    if not (math.isfinite(amount) and amount >= 0):
        raise InputError(f"grain must be a finite number >= 0 (0 = off, 1 = matched), got {amount}.")
    if amount == 0:
        return rendered
    try:
        gen = torch.Generator().manual_seed(int(seed))
    except (RuntimeError, ValueError, TypeError, OverflowError):
        raise InputError(f"grain_seed must be an integer in [0, 2^64), got {seed!r}.") from None
    r = radius.abs().to(rendered.device)
    cov = grain_covariance(original.to(rendered.device), r < IN_FOCUS_RADIUS).double()
    vals, vecs = torch.linalg.eigh(cov)  # a square root that also serves grey (rank-1) noise
    root = vecs * vals.clamp_min(0).sqrt()
    noise = torch.randn(rendered.shape, generator=gen).to(rendered.device) @ root.T.float()
    weight = (r - IN_FOCUS_RADIUS).clamp(0, 1)[..., None] * amount
    return (rendered + (noise * weight).to(rendered.dtype)).clamp(0.0, 1.0)
