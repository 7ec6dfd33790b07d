"""Steady frames for generative clips: where a frame's inputs equal the previous frame's, keep the
previous frame's pixels.

A focus pull through BokehNet samples every frame from the same noise, so two frames differ only
through their inputs (the image and the defocus map). But FLUX attends over the whole frame: a blur
change in one corner moves the sampled texture everywhere a little, and a clip then shimmers in
regions whose focus never changed. `hold_unchanged` composites each frame over the previous output:
the new frame where its inputs changed or where light from a changed pixel can land (the larger of
the two blur radii around it), the previous output elsewhere, with a short feathered seam. A frame
whose inputs changed nowhere is the previous output; a frame that changed everywhere (most focus
pulls move every depth's blur) is the new frame untouched.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .defocus import MAX_COC
from .errors import InputError

# A blur radius change below this (px) is no change: BokehNet's condition is stored at 8 bits of
# MAX_COC = 100 px after the VAE, so 0.05 px is far below what it can see.
HOLD_TOLERANCE_PX = 0.05
# Width of the seam (px) over which the new frame fades into the held one.
HOLD_FEATHER_PX = 4


def changed_region(defocus_a: torch.Tensor, defocus_b: torch.Tensor, image_a: torch.Tensor, image_b: torch.Tensor,
                   tolerance_px: float = HOLD_TOLERANCE_PX) -> torch.Tensor:
    """[H,W] bool: where the network's inputs differ between two frames: the image, or the blur radius
    as BokehNet sees it (clamped at MAX_COC) by more than tolerance_px."""
    seen_a, seen_b = defocus_a.clamp(max=MAX_COC), defocus_b.clamp(max=MAX_COC)
    return ((seen_a - seen_b).abs() > tolerance_px) | (image_a != image_b).any(-1)


def _grow(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Dilate an [H,W] mask by a square of half-width px (float 0/1)."""
    if px <= 0:
        return mask.float()
    return F.max_pool2d(mask.float()[None, None], 2 * px + 1, stride=1, padding=px)[0, 0]


def new_frame_weight(changed: torch.Tensor, reach_px: float, feather_px: int = HOLD_FEATHER_PX) -> torch.Tensor:
    """[H,W] weight of the new frame: 1 within reach_px of a changed pixel, 0 beyond reach_px +
    2 * feather_px, a box-filtered ramp between."""
    reach = int(math.ceil(reach_px))
    grown = _grow(changed, reach + feather_px)
    if feather_px <= 0:
        return grown
    k = 2 * feather_px + 1
    return F.avg_pool2d(grown[None, None], k, stride=1, padding=feather_px, count_include_pad=False)[0, 0]


def hold_unchanged(frames: torch.Tensor, images: torch.Tensor, defocus: torch.Tensor,
                   tolerance_px: float = HOLD_TOLERANCE_PX, feather_px: int = HOLD_FEATHER_PX) -> torch.Tensor:
    """frames [B,H,W,C] (generated from images [B,H,W,C] and defocus radii [B,H,W] in px, in clip
    order) -> frames where each one keeps the previous output wherever its inputs, and the light of
    every changed pixel, leave it unchanged."""
    if frames.ndim != 4 or images.shape != frames.shape or defocus.shape != frames.shape[:3]:
        raise InputError(f"hold_unchanged: frames {tuple(frames.shape)}, images {tuple(images.shape)} and defocus "
                         f"{tuple(defocus.shape)} must be [B,H,W,C], [B,H,W,C] and [B,H,W].")
    out = frames.clone()
    for t in range(1, frames.shape[0]):
        changed = changed_region(defocus[t - 1], defocus[t], images[t - 1], images[t], tolerance_px)
        if bool(changed.all()):
            continue
        if not bool(changed.any()):
            out[t] = out[t - 1]
            continue
        # light of a changed pixel lands within its blur radius, before or after the change
        reach = float(torch.maximum(defocus[t - 1][changed], defocus[t][changed]).clamp(max=MAX_COC).max())
        w = new_frame_weight(changed, reach, feather_px).to(frames.dtype)[..., None]
        out[t] = w * frames[t] + (1 - w) * out[t - 1]
    return out
