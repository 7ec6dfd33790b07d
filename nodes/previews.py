"""Preview pictures for node outputs (plain torch, no ComfyUI)."""
from __future__ import annotations

import torch


def disparity_preview(disparity: torch.Tensor) -> torch.Tensor:
    """Disparity [B,H,W] -> grey IMAGE [B,H,W,3], per image min-max normalised: bright = near."""
    d = disparity.float()
    lo = d.flatten(1).amin(1).view(-1, 1, 1)
    hi = d.flatten(1).amax(1).view(-1, 1, 1)
    g = (d - lo) / (hi - lo).clamp_min(1e-12)
    g = torch.where((hi - lo) > 1e-12, g, torch.full_like(g, 0.5))
    return g[..., None].expand(-1, -1, -1, 3).contiguous()
