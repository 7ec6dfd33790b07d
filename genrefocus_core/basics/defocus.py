"""Defocus-map math shared by the generative BokehNet and the classical renderer.

Conventions (the paper's, kept everywhere in the pack):
- disparity = 1 / depth, depth in metres (Depth Pro), so disparity is in 1/m; bigger = nearer.
  Non-positive or infinite depth means "infinitely far": disparity 0.
- The signed circle-of-confusion radius in pixels is `K * (disparity - focus_disparity)`:
  positive in front of the focal plane, negative behind it. The defocus map is its absolute value.
- BokehNet's condition is `clamp(defocus / MAX_COC, 0, 1)` with MAX_COC = 100, repeated to RGB.
"""
from __future__ import annotations

import logging
import math

import torch

from .errors import InputError
from .images import resize_map, to_map_batch

log = logging.getLogger(__name__)

MAX_COC = 100.0
# Blur levels above this are accepted but almost certainly a slip (the paper's slider stops at 50).
K_WARN = 1000.0


def disparity_from_depth(depth) -> torch.Tensor:
    """Metric depth [B,H,W] (or anything `to_map_batch` takes) -> disparity [B,H,W] in 1/m.

    Handling: depth <= 0 or +inf -> disparity 0 (infinitely far, as the reference does);
    NaN pixels are unknown: they are filled with the median disparity of the valid pixels of the
    same image and a warning is logged; an image whose depth is NaN everywhere is an error.
    """
    d = to_map_batch(depth, "depth")
    disp = torch.where(d > 0, 1.0 / d.clamp_min(1e-12), torch.zeros_like(d))
    disp = torch.where(torch.isinf(d), torch.zeros_like(d), disp)
    nan = torch.isnan(d)
    if nan.any():
        out = disp.clone()
        for b in range(d.shape[0]):
            if nan[b].all():
                raise InputError("Depth map is NaN everywhere: the depth estimate failed; check the depth input.")
            if nan[b].any():
                out[b][nan[b]] = disp[b][~nan[b]].median()
        log.warning("Depth map had %d NaN pixels; filled with the median disparity.", int(nan.sum()))
        disp = out
    return disp


def check_blur_level(K: float) -> float:
    """K must be a finite number >= 0 (0 = no blur). Very large values are allowed with a warning."""
    try:
        K = float(K)
    except (TypeError, ValueError):
        raise InputError(f"Blur level K must be a number, got {K!r}.") from None
    if not math.isfinite(K) or K < 0:
        raise InputError(f"Blur level K must be a finite number >= 0 (0 = no blur), got {K}.")
    if K > K_WARN:
        log.warning("Blur level K=%g is far above the usual 0..50 range; the blur radius will be huge.", K)
    return K


FOCUS_MODES = ("point", "mask", "value", "distance", "depth")


def _per_image(values, B: int, what: str) -> torch.Tensor:
    """A scalar or one value per image -> float32 [B]; non-finite values are an InputError."""
    try:
        v = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} must be a number or one number per image, got {values!r}.") from None
    if v.numel() not in (1, B):
        raise InputError(f"{what}: expected 1 or {B} values, got {v.numel()}.")
    if torch.isnan(v).any():
        raise InputError(f"{what} must be a number, got NaN.")
    return v.expand(B).clone()


def disparity_range(disparity) -> tuple[float, float]:
    """(nearest, farthest) disparity of the whole batch: the ends of the 0-1 depth slider.

    One range for the batch, so that a clip keeps its slider meaning from frame to frame."""
    disp = to_map_batch(disparity, "disparity")
    finite = disp[torch.isfinite(disp)]
    if finite.numel() == 0:
        raise InputError("Disparity map has no finite values; check the depth input.")
    return float(finite.max()), float(finite.min())


def resolve_focus(disparity, mode: str | None = None, *, point=None, normalized: bool = False, mask=None,
                  value=None, distance_m=None, depth=None, metric: bool = True,
                  depth_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Disparity of the focal plane, one value per image -> [B]. The one place where a focus choice
    becomes a focal plane (nodes, CLI and focus pulls call it).

    The ways to choose it (each: one value for the whole batch or one per image):
    - point: (x, y) pixel column and row (fractions of width/height with normalized=True); a point
      outside the image is an error.
    - mask: [H,W] or [B,H,W] in-focus region; the median disparity inside (mask > 0.5). An empty mask
      falls back to the whole image's median (as the reference does), with a warning.
    - value: an explicit disparity (1/m for metric depth).
    - distance_m: the distance the lens is focused at, in metres (the focal plane where the blur is
      zero); inf = focused at infinity (disparity 0). Needs metric depth.
    - depth: a 0-1 slider through the scene's depth: 0 = the nearest disparity of the batch, 1 = the
      farthest, linear in disparity (as a lens's focus ring); depth_range = (nearest, farthest)
      disparity overrides the batch's own range (e.g. the range of a whole clip).
    mode: one of FOCUS_MODES; the matching argument is then required and the others are ignored (how
    the node passes all its widgets). Without mode at most one may be given; none = the centre pixel
    (the reference's default).
    """
    disp = to_map_batch(disparity, "disparity")
    B, H, W = disp.shape
    choices = {"point": point, "mask": mask, "value": value, "distance": distance_m, "depth": depth}
    if mode is None:
        given = [k for k, v in choices.items() if v is not None]
        if len(given) > 1:
            raise InputError(f"Give the focus as one of: {', '.join(FOCUS_MODES)}; got several ({', '.join(given)}).")
        mode = given[0] if given else "point"
    elif mode not in FOCUS_MODES:
        raise InputError(f"Unknown focus mode {mode!r}; use one of {', '.join(FOCUS_MODES)}.")
    elif choices[mode] is None and mode != "point":
        raise InputError(f"Focus mode {mode!r} needs its {'distance_m' if mode == 'distance' else mode} input.")
    if mode == "value":
        v = _per_image(value, B, "Focus disparity")
        if torch.isinf(v).any():
            raise InputError(f"Focus disparity must be finite, got {value}.")
        return v.to(disp.device)
    if mode == "distance":
        if not metric:
            raise InputError("Focus by distance (metres) needs metric depth; this depth is relative. Focus by "
                             "point, mask, value or the 0-1 depth slider instead, or use a metric depth source.")
        d = _per_image(distance_m, B, "Focus distance")
        if (d <= 0).any():
            raise InputError(f"Focus distance must be a positive number of metres (inf = infinity), got {distance_m}.")
        return (1.0 / d).to(disp.device)  # 1 / inf = 0: focused at infinity
    if mode == "depth":
        s = _per_image(depth, B, "Focus depth slider")
        if ((s < 0) | (s > 1)).any():
            raise InputError(f"Focus depth slider must lie in [0, 1] (0 = nearest, 1 = farthest), got {depth}.")
        near, far = disparity_range(disp) if depth_range is None else (float(depth_range[0]), float(depth_range[1]))
        if not (math.isfinite(near) and math.isfinite(far)):
            raise InputError(f"depth_range must be two finite disparities, got {depth_range}.")
        return (near - s.double() * (near - far)).float().to(disp.device)
    if mode == "mask":
        m = to_map_batch(mask, "focus mask", batch=B).to(disp.device)
        if m.shape[-2:] != disp.shape[-2:]:
            m = resize_map(m, (H, W), mode="nearest")
        out = []
        for b in range(B):
            sel = m[b] > 0.5
            if not sel.any():
                log.warning("Focus mask is empty; focusing on the median disparity of the whole image.")
                sel = torch.ones_like(sel)
            out.append(disp[b][sel].median())
        return torch.stack(out)
    if point is None:
        pts = [(W // 2, H // 2)] * B
    else:
        try:
            p = torch.as_tensor(point, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"Focus point must be (x, y) or one (x, y) per image, got {point!r}.") from None
        if p.ndim == 1:
            p = p[None].expand(B, -1)
        if p.shape != (B, 2):
            raise InputError(f"Focus point: expected (x, y) or one (x, y) per image, got shape {tuple(p.shape)}.")
        if not torch.isfinite(p).all():
            raise InputError(f"Focus point must be finite numbers, got {point}.")
        if normalized:
            if ((p < 0) | (p > 1)).any():
                raise InputError(f"Normalised focus point {point} must lie in [0, 1] x [0, 1].")
            p = (p * torch.tensor([W - 1, H - 1], dtype=torch.float64)).round()
        pts = [(int(x), int(y)) for x, y in p.tolist()]
        for x, y in pts:
            if not (0 <= x < W and 0 <= y < H):
                raise InputError(f"Focus point (x={x}, y={y}) lies outside the {W}x{H} image.")
    return torch.stack([disp[b, y, x] for b, (x, y) in enumerate(pts)])


focus_disparity = resolve_focus  # the name of earlier releases


def signed_coc(disparity, disp_focus, K: float) -> torch.Tensor:
    """Signed CoC radius in pixels [B,H,W]: K * (disparity - focus); > 0 in front of focus."""
    K = check_blur_level(K)
    disp = to_map_batch(disparity, "disparity")
    f = torch.as_tensor(disp_focus, dtype=disp.dtype, device=disp.device).reshape(-1, 1, 1)
    return K * (disp - f)


def defocus_map(disparity, disp_focus, K: float) -> torch.Tensor:
    """|K * (disparity - disp_focus)| in pixels of CoC radius, [B,H,W]."""
    return signed_coc(disparity, disp_focus, K).abs()


def network_condition(defocus: torch.Tensor, max_coc: float = MAX_COC) -> torch.Tensor:
    """Defocus map [B,H,W] in px -> BokehNet's condition [B,3,H,W] = clamp(map / max_coc, 0, 1)."""
    d = to_map_batch(defocus, "defocus map")
    return (d / max_coc).clamp(0.0, 1.0)[:, None].expand(-1, 3, -1, -1).contiguous()


def blur_level_from_lens(f_number: float, focal_length_mm: float, sensor_width_mm: float,
                         focus_distance_m: float, image_long_edge_px: int) -> float:
    """K (px of CoC radius per 1/m of disparity) from thin-lens parameters.

    Thin lens: a point at distance D has CoC radius r = f^2 / (2 N (D_f - f)) * D_f * |1/D - 1/D_f|
    on the sensor (all lengths in mm). In pixels multiply by long edge px / sensor width mm. With
    disparity in 1/m, 1/D[mm] = disparity / 1000, so K = f^2 D_f / (2 N (D_f - f)) * px/mm / 1000.
    """
    for name, v in (("f-number", f_number), ("focal length", focal_length_mm), ("sensor width", sensor_width_mm),
                    ("focus distance", focus_distance_m), ("image size", image_long_edge_px)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"Lens parameter {name} must be a positive number, got {v!r}.")
    f = float(focal_length_mm)
    d_f = float(focus_distance_m) * 1000.0
    if d_f <= f:
        raise InputError(f"Focus distance {focus_distance_m} m is inside the focal length {f} mm: nothing can be in focus.")
    px_per_mm = float(image_long_edge_px) / float(sensor_width_mm)
    return f * f * d_f / (2.0 * float(f_number) * (d_f - f)) * px_per_mm / 1000.0
