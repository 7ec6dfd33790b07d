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
from dataclasses import dataclass

import torch

from .errors import InputError
from .images import fill_with_median, resize_map, to_map_batch

log = logging.getLogger(__name__)

MAX_COC = 100.0
# Pixels whose blur radius is below this are in focus: the classical renderer returns them exactly.
IN_FOCUS_RADIUS = 0.5
# Blur levels above this are accepted but almost certainly a slip (the paper's slider stops at 50).
K_WARN = 1000.0


def disparity_from_depth(depth) -> torch.Tensor:
    """Metric depth [B,H,W] (or anything `to_map_batch` takes) -> disparity [B,H,W] in 1/m.

    Handling: depth <= 0 or +inf -> disparity 0 (infinitely far, as the reference does);
    NaN pixels are unknown: they are filled with the median disparity of the valid pixels of the
    same image and a warning is logged; an image whose depth is NaN everywhere is an error.
    """
    d = to_map_batch(depth, "depth")
    require_positive_depth(d, "Depth map")
    disp = torch.where(d > 0, 1.0 / d.clamp_min(1e-12), torch.zeros_like(d))
    disp = torch.where(torch.isinf(d), torch.zeros_like(d), disp)
    nan = torch.isnan(d)
    if nan.any():
        disp = fill_with_median(disp, nan, "Depth map (image {b}) is NaN everywhere: the depth estimate failed; "
                                           "check the depth input.")
        log.warning("Depth map had %d NaN pixels; filled with the median disparity.", int(nan.sum()))
    return disp


def require_positive_depth(depth: torch.Tensor, name: str) -> torch.Tensor:
    """Metric depth [B,H,W] must hold some depth: an image whose depth is nowhere positive and finite
    (all zero, negative or infinite; NaN pixels count as unknown) would be "everything infinitely far",
    a flat render reported as success, so it is an InputError. Returns the mask of valid pixels."""
    valid = (depth > 0) & torch.isfinite(depth)
    known = ~torch.isnan(depth)
    for b in range(depth.shape[0]):
        if known[b].any() and not valid[b].any():
            raise InputError(f"{name} (image {b}) has no positive finite depth (all zero, negative or infinite): "
                             "it holds no depth. Check the depth source, or its kind (depth or disparity) and "
                             "scale (metric or relative).")
    return valid


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
        m = to_map_batch(mask, "focus mask", batch=B, size=(H, W)).to(disp.device)
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


def signed_coc(disparity, disp_focus, K, *, band=None, near_scale: float = 1.0,
               far_scale: float = 1.0) -> torch.Tensor:
    """Signed CoC radius in pixels [B,H,W]: K * (disparity - focus); > 0 in front of focus.

    disp_focus: the focal plane's disparity, one per image [B] or per pixel [B,H,W] (a tilted plane,
    `tilted_focal_plane`). K: a blur level or one per image. band: (front, back) disparity extents [B] (see `in_focus_band`)
    of a band around the focal plane kept sharp: zero blur inside, and outside it the blur grows from
    the band's edge, K * (disparity - edge), so it stays continuous. near_scale / far_scale multiply
    the blur in front of / behind the focal plane (1 = the lens; 0 = sharp on that side).
    """
    disp = to_map_batch(disparity, "disparity")
    B = disp.shape[0]
    k = _per_image([check_blur_level(x) for x in torch.as_tensor(K, dtype=torch.float64).flatten().tolist()],
                   B, "Blur level K").to(disp).view(-1, 1, 1)
    f = torch.as_tensor(disp_focus, dtype=disp.dtype, device=disp.device)
    f = f.reshape(-1, *disp.shape[1:]) if f.numel() == disp.numel() and f.numel() > B else f.reshape(-1, 1, 1)
    d = disp - f
    if band is not None:
        front, back = (torch.as_tensor(x, dtype=disp.dtype, device=disp.device).reshape(-1, 1, 1) for x in band)
        d = torch.where(d > front, d - front, torch.where(d < -back, d + back, torch.zeros_like(d)))
    near, far = (_scale(x, name) for x, name in ((near_scale, "near_scale"), (far_scale, "far_scale")))
    if near != 1.0 or far != 1.0:
        d = d * torch.where(d > 0, near, far)
    return k * d


def _scale(x, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {x!r}.") from None
    if not (math.isfinite(v) and v >= 0):
        raise InputError(f"{name} must be a finite number >= 0 (1 = unchanged, 0 = no blur), got {x}.")
    return v


def in_focus_band(focus, *, range_m: float = 0.0, range_fraction: float = 0.0, metric: bool = True,
                  disparity=None, depth_range: tuple[float, float] | None = None):
    """(front, back) disparity extents [B] of the band of depths kept sharp around the focal plane.

    range_m: the band's depth in metres, centred on the focus distance D: from D - range_m / 2 (the
      whole foreground when that is <= 0) to D + range_m / 2. Needs metric depth; a focal plane at
      infinity has no band in metres.
    range_fraction: the band's width as a fraction of the scene's disparity range (the 0-1 depth
      slider's units), centred on the focal plane: of `depth_range` (nearest, farthest) or else of
      `disparity`'s whole batch (as `resolve_focus`).
    At most one of them may be non-zero; (0, 0) = no band.
    """
    f = torch.as_tensor(focus, dtype=torch.float32).flatten()
    range_m, range_fraction = _scale(range_m, "in-focus range (m)"), _scale(range_fraction, "in-focus range fraction")
    if range_m > 0 and range_fraction > 0:
        raise InputError("Give the in-focus range in metres or as a fraction, not both.")
    zero = torch.zeros_like(f)
    if range_m > 0:
        if not metric:
            raise InputError("An in-focus range in metres needs metric depth; this depth is relative. Give it as a "
                             "fraction of the depth range instead.")
        dist = 1.0 / f.double()  # inf at disparity 0
        near, far = dist - range_m / 2, dist + range_m / 2
        front = torch.where(near > 0, 1.0 / near.clamp_min(1e-300), torch.full_like(near, math.inf)) - f.double()
        back = f.double() - 1.0 / far
        front = torch.where(torch.isinf(dist), zero.double(), front)
        back = torch.where(torch.isinf(dist), zero.double(), back)
        return front.float(), back.float()
    if range_fraction > 0:
        if range_fraction > 1:
            raise InputError(f"In-focus range fraction must be in [0, 1], got {range_fraction}.")
        if depth_range is None:
            if disparity is None:
                raise InputError("An in-focus range as a fraction needs the disparity (or depth_range) it is a "
                                 "fraction of.")
            depth_range = disparity_range(disparity)
        half = 0.5 * range_fraction * abs(float(depth_range[0]) - float(depth_range[1]))
        return zero + half, zero + half
    return zero, zero


MAX_TILT = 2.0  # a floor seen in the lower half of the frame needs about twice the depth range


@dataclass(frozen=True)
class FocusTilt:
    """A tilted focal plane (a tilt lens, Scheimpflug): the plane turns about a pivot so that its
    distance changes across the frame.

    angle_deg: direction of the line through the pivot that stays at the pivot's focus (0 = horizontal,
      positive = turned counter-clockwise on screen, 90 = vertical); amount: how far the focal plane
      moves across the frame, as a fraction of the scene's depth range (the 0-1 depth slider's units;
      a scene without depth range is not tilted), from the frame's edge on one side of that line to the
      other. Positive: the plane comes nearer toward the bottom of the frame (angle 0; toward the right
      at angle 90), as a floor does, so more of a receding floor is sharp; negative: against the floor,
      a thin sharp band (the "miniature" tilt-shift look). pivot: (x, y) as
      fractions of width and height (as the focus point: 0 and 1 are the outermost pixel centres).
    """

    angle_deg: float = 0.0
    amount: float = 0.0
    pivot: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self):
        values = (self.angle_deg, self.amount, *self.pivot)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise InputError(f"Focus tilt: angle, amount and pivot must be finite numbers, got {self}.")
        if not -MAX_TILT <= self.amount <= MAX_TILT:
            raise InputError(f"Focus tilt amount must lie in [-{MAX_TILT:g}, {MAX_TILT:g}] (fractions of the depth "
                             f"range), got {self.amount}.")
        if not all(0.0 <= v <= 1.0 for v in self.pivot):
            raise InputError(f"Focus tilt pivot {self.pivot} must lie in [0, 1] x [0, 1].")


def tilted_focal_plane(focus, tilt: FocusTilt, shape: tuple[int, int, int],
                       depth_range: tuple[float, float]) -> torch.Tensor:
    """Disparity of a tilted focal plane at every pixel [B,H,W]: the pivot's focus [B] plus a ramp
    across the frame. A plane in space has a disparity that is affine in image coordinates (1/Z of
    a plane is linear in x/Z, y/Z), so an affine ramp is exactly a tilted plane seen by the camera.

    The ramp runs along the normal of the tilt line; it changes by amount * (nearest - farthest) from
    the outermost pixel centre on one side to the other (so amount 1 at angle 0 follows a floor that
    spans the scene's depth range from the top row to the bottom row: all of it sharp)."""
    B, H, W = shape
    f = torch.as_tensor(focus, dtype=torch.float32).flatten()
    theta = math.radians(tilt.angle_deg)
    nx, ny = math.sin(theta), math.cos(theta)  # y down: angle 0 -> the ramp runs down, 90 -> to the right
    extent = max(abs(nx) * (W - 1) + abs(ny) * (H - 1), 1.0)  # between the outermost pixel centres
    x = torch.arange(W, dtype=torch.float64) - tilt.pivot[0] * (W - 1)
    y = torch.arange(H, dtype=torch.float64) - tilt.pivot[1] * (H - 1)
    along = (y[:, None] * ny + x[None, :] * nx) / extent  # spans 1 over the frame, 0 on the tilt line
    span = float(depth_range[0]) - float(depth_range[1])  # nearest - farthest disparity, >= 0
    return (f.view(-1, 1, 1).double() + (tilt.amount * span) * along).float()


def in_focus_mask(signed: torch.Tensor) -> torch.Tensor:
    """[B,H,W] float 1 where the blur radius is below IN_FOCUS_RADIUS (rendered exactly sharp), else 0."""
    return (signed.abs() < IN_FOCUS_RADIUS).float()


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
    disparity in 1/m, 1/D[mm] = disparity / 1000, so K = f^2 / (2 N (1 - f / D_f)) * px/mm / 1000;
    focus_distance_m = inf (focused at infinity) gives the limit f^2 / (2 N) * px/mm / 1000.
    """
    for name, v in (("f-number", f_number), ("focal length", focal_length_mm), ("sensor width", sensor_width_mm),
                    ("image size", image_long_edge_px)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"Lens parameter {name} must be a positive number, got {v!r}.")
    if not (isinstance(focus_distance_m, (int, float)) and float(focus_distance_m) > 0):
        raise InputError(f"Lens focus distance must be a positive number of metres (inf = infinity), "
                         f"got {focus_distance_m!r}.")
    f = float(focal_length_mm)
    ratio = f / (float(focus_distance_m) * 1000.0)  # 0 at infinity
    if ratio >= 1.0:
        raise InputError(f"Focus distance {focus_distance_m} m is inside the focal length {f} mm: nothing can be in focus.")
    px_per_mm = float(image_long_edge_px) / float(sensor_width_mm)
    return f * f / (2.0 * float(f_number) * (1.0 - ratio)) * px_per_mm / 1000.0


@dataclass(frozen=True)
class Lens:
    """A thin lens: f-number, focal length and sensor width (36 mm = full frame)."""

    f_number: float
    focal_length_mm: float
    sensor_width_mm: float = 36.0

    def blur_levels(self, focus, image_long_edge_px: int) -> torch.Tensor:
        """K per image [B] for a lens focused at each focal plane (disparity 0 = infinity)."""
        f = torch.as_tensor(focus, dtype=torch.float64).flatten()
        return torch.tensor([blur_level_from_lens(self.f_number, self.focal_length_mm, self.sensor_width_mm,
                                                  1.0 / d if d > 0 else math.inf, image_long_edge_px)
                             for d in f.tolist()], dtype=torch.float32)


@dataclass
class Defocus:
    """A defocus map and what made it: signed CoC radius [B,H,W] in px (> 0 in front of the focal
    plane), focal-plane disparity [B] (at the pivot of a tilted plane) and blur level K [B] (per image: a lens focused elsewhere
    blurs differently)."""

    signed_coc: torch.Tensor
    focus_disparity: torch.Tensor
    K: torch.Tensor


def build_defocus(disparity, focus, *, K: float | None = None, lens: Lens | None = None, metric: bool = True,
                  in_focus_m: float = 0.0, in_focus_fraction: float = 0.0, near_scale: float = 1.0,
                  far_scale: float = 1.0, depth_range: tuple[float, float] | None = None,
                  tilt: FocusTilt | None = None) -> Defocus:
    """The lens rules in one place (nodes and CLI): focal plane `focus` [B] (from `resolve_focus`),
    blur level K or a thin lens focused on that plane (needs metric depth), an in-focus band,
    near/far blur scales and a tilt of the focal plane about the pivot (`FocusTilt`; the lens's K
    and the band are those of the pivot's focus) -> Defocus."""
    disp = to_map_batch(disparity, "disparity")
    B, H, W = disp.shape
    f = torch.as_tensor(focus, dtype=torch.float32).flatten().to(disp.device)
    if f.numel() == 1:
        f = f.expand(B).clone()
    if f.numel() != B or not torch.isfinite(f).all():
        raise InputError(f"Focus disparity: expected {B} finite values, got {focus}.")
    if lens is not None:
        if K is not None:
            raise InputError("Give the blur as a level K or as a lens, not both.")
        if not metric:
            raise InputError("Lens blur needs metric depth (1/m disparity); this depth is relative. Give the blur "
                             "level K instead, or use a metric depth source.")
        ks = lens.blur_levels(f, max(H, W))
    else:
        ks = _per_image(check_blur_level(20.0 if K is None else K), B, "Blur level K")
    band = in_focus_band(f, range_m=in_focus_m, range_fraction=in_focus_fraction, metric=metric, disparity=disp,
                         depth_range=depth_range)
    plane = f
    if tilt is not None and tilt.amount != 0.0:
        plane = tilted_focal_plane(f, tilt, (B, H, W), disparity_range(disp) if depth_range is None else depth_range)
    coc = signed_coc(disp, plane.to(disp.device), ks, band=band, near_scale=near_scale, far_scale=far_scale)
    return Defocus(signed_coc=coc, focus_disparity=f, K=ks)
