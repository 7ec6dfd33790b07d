"""Preview pictures for node outputs (plain torch, no ComfyUI)."""
from __future__ import annotations

import torch


def disparity_preview(disparity: torch.Tensor) -> torch.Tensor:
    """Disparity [B,H,W] -> grey IMAGE [B,H,W,3], bright = near, min-max normalised over the whole
    batch (one scale for the frames of a clip, so the preview does not flicker either)."""
    d = disparity.float()
    lo, hi = d.min(), d.max()
    if float(hi - lo) <= 1e-12:
        return torch.full((*d.shape, 3), 0.5)
    g = (d - lo) / (hi - lo)
    return g[..., None].expand(-1, -1, -1, 3).contiguous()
