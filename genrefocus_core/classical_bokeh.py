"""Classical depth-of-field renderer: occlusion-aware layered compositing in linear light.

How it works (one pass per depth level, far to near):
1. The signed circle-of-confusion radius r = K * (disparity - focus) (px; > 0 in front of the focal
   plane) is cut into levels 0, +-1, +-2, ... whose spacing grows with |r| (about 1/8 of r by default).
   Each pixel's light is split between the two levels that bracket its radius, with weights chosen so
   that the half-maximum outline of the mixed point-spread function lies exactly at r (the kernels
   have linear edge ramps as wide as the level spacing; see `apertures.Aperture.ramp_kernel`). So the
   CoC radius is right to a small fraction of a pixel with a few dozen levels, not hundreds.
2. Each level (premultiplied linear colour + coverage alpha) is convolved with the aperture kernel
   at its radius by FFT. Levels whose spacing is >= 4 px are rendered on a grid coarser by a power of
   two (bilinear splat down, bilinear interpolation up, both preserving energy and position); this
   bounds cost and memory for any radius.
3. Levels are composited back to front with "over": a level hides what lies at least two levels
   behind it by its blurred coverage. So an in-focus surface receives no light from behind it, and a
   blurred foreground spills over a sharp background with its partial-occlusion alpha. Neighbouring
   levels (the same surface split in two) do not hide each other.
4. The sum is divided by the accumulated coverage (regions next to an occluder are extended with the
   visible surface behind, and image borders keep their brightness), then converted back to the input
   colour space. Pixels with |r| < 0.5 that receive no light from another level are copied exactly.

Same torch code on CPU and CUDA; batched [B, H, W, 3].
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .apertures import Aperture, circle
from .defocus import check_blur_level, focus_disparity as focus_from, signed_coc
from .errors import InputError
from .images import resize_map, to_image_batch, to_map_batch

log = logging.getLogger(__name__)

# Relative level spacing: delta(r) = max(1, r * LEVEL_STEP). Smaller = crisper edges, more levels.
LEVEL_STEP = 0.125
# Radii are capped at this fraction of the image's long edge (a bigger blur is a uniform wash).
MAX_RADIUS_FRACTION = 0.5
# Pixels with |r| below this are in focus: copied exactly.
IN_FOCUS_RADIUS = 0.5


# ------------------------------------------------------------------------------------------------
# colour


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


# ------------------------------------------------------------------------------------------------
# levels


@dataclass(frozen=True)
class Level:
    radius: float   # circumradius in full-resolution pixels (0 = identity)
    ramp: float     # edge ramp width in full-resolution pixels (>= spacing to the neighbours)
    scale: int      # rendered on a grid `scale` times coarser
    plateau_norm: float  # 1 / (centre value of the level's PSF), full-resolution units


def build_levels(max_radius: float, aperture: Aperture, level_step: float = LEVEL_STEP) -> list[Level]:
    """Unsigned level ladder covering [0, max_radius]: 0, 1, 2, ... then growing by level_step * r."""
    if not 0.01 <= level_step <= 1.0:
        raise InputError(f"level_step must be in [0.01, 1], got {level_step}.")
    levels = [Level(0.0, 0.0, 1, 1.0)]
    r = 1.0
    while True:
        delta = max(1.0, r * level_step)
        scale = 1
        while scale * 4 <= delta:  # keep the ramp >= 2 coarse pixels so interpolation stays exact
            scale *= 2
        # plateau_norm = sum of the un-normalised kernel (its centre value is 1) times scale^2
        raw = aperture.ramp_kernel(r / scale, delta / scale, dtype=torch.float64, normalize=False)
        levels.append(Level(r, delta, scale, float(raw.sum()) * scale * scale))
        if r >= max_radius:
            break
        r += delta
    return levels


def level_weights(radius_abs: torch.Tensor, levels: list[Level]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For |r| [B,H,W] -> (lower level index, its weight, upper weight); upper index = lower + 1.

    Weights split the pixel's light so that the mixed PSF's half-maximum outline sits at |r|: with
    ramp values f1 = clamp(0.5 - (r - r1)/w1), f2 = clamp(0.5 + (r2 - r)/w2) at distance r, the centre
    heights a1, a2 must satisfy a1 (f1 - 0.5) + a2 (f2 - 0.5) = 0; light weights are e_i = a_i * norm_i.
    """
    radii = torch.tensor([lv.radius for lv in levels], dtype=radius_abs.dtype, device=radius_abs.device)
    ramps = torch.tensor([lv.ramp for lv in levels], dtype=radius_abs.dtype, device=radius_abs.device)
    norms = torch.tensor([lv.plateau_norm for lv in levels], dtype=radius_abs.dtype, device=radius_abs.device)
    n = len(levels) - 1
    r = radius_abs.clamp(0.0, float(radii[-1]))
    lo = (torch.searchsorted(radii, r.contiguous(), right=True) - 1).clamp(0, max(n - 1, 0))
    if n == 0:
        return lo, torch.ones_like(r), torch.zeros_like(r)
    hi = lo + 1
    r1, r2 = radii[lo], radii[hi]
    f1 = (0.5 - (r - r1) / ramps[lo].clamp_min(1e-6)).clamp(0.0, 1.0)
    f2 = (0.5 + (r2 - r) / ramps[hi]).clamp(0.0, 1.0)
    a1 = (f2 - 0.5).clamp_min(0.0)
    a2 = (0.5 - f1).clamp_min(0.0)
    e1, e2 = a1 * norms[lo], a2 * norms[hi]
    w_hi = e2 / (e1 + e2).clamp_min(1e-12)
    # between identity (level 0) and radius 1: in focus below 0.5, then a linear blend
    first = lo == 0
    t = ((r - IN_FOCUS_RADIUS) / (radii[1] - IN_FOCUS_RADIUS)).clamp(0.0, 1.0)
    w_hi = torch.where(first, t, w_hi)
    w_hi = torch.where(r >= radii[-1], torch.ones_like(w_hi), w_hi)
    return lo, 1.0 - w_hi, w_hi


# ------------------------------------------------------------------------------------------------
# convolution


def _fast_size(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    best = 1 << (max(n - 1, 1)).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fft_convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """'Same'-size linear convolution of x [N,C,H,W] with an odd square kernel [k,k], zero outside."""
    k = kernel.shape[-1]
    if k == 1:
        return x * kernel.reshape(())
    h, w = x.shape[-2:]
    p = k // 2
    lh, lw = _fast_size(h + p), _fast_size(w + p)
    kpad = torch.zeros(lh, lw, dtype=x.dtype, device=x.device)
    kk = kernel.to(x.dtype)
    # centre of the kernel at index (0, 0), wrapping negative offsets to the end
    kpad[: k - p, : k - p] = kk[p:, p:]
    kpad[: k - p, lw - p:] = kk[p:, :p]
    kpad[lh - p:, : k - p] = kk[:p, p:]
    kpad[lh - p:, lw - p:] = kk[:p, :p]
    spec = torch.fft.rfft2(x, s=(lh, lw)) * torch.fft.rfft2(kpad)
    return torch.fft.irfft2(spec, s=(lh, lw))[..., :h, :w]


class _Resampler:
    """Bilinear interpolation from a grid `scale` times coarser (pixel centres aligned as in
    align_corners=False) and its adjoint, the bilinear splat. Splat then interpolate keeps total
    energy and the centroid of every pixel's light; the coarse grid has one extra cell on each side
    so nothing is clamped at image borders."""

    def __init__(self, size: int, scale: int, device):
        u = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / scale - 0.5
        f = u.floor()
        self.i0 = (f + 1).long()
        self.w1 = (u - f)
        self.w0 = 1.0 - self.w1
        self.coarse = int(math.ceil(size / scale)) + 2
        self.scale = scale

    def splat(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = self.coarse
        out = torch.zeros(shape, dtype=x.dtype, device=x.device)
        view = [1] * x.ndim
        view[dim] = -1
        out.index_add_(dim, self.i0, x * self.w0.view(view))
        out.index_add_(dim, self.i0 + 1, x * self.w1.view(view))
        return out

    def interpolate(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        view = [1] * y.ndim
        view[dim] = -1
        return (y.index_select(dim, self.i0) * self.w0.view(view)
                + y.index_select(dim, self.i0 + 1) * self.w1.view(view))


def _blur_level(x: torch.Tensor, level: Level, aperture: Aperture, flip: bool,
                resamplers: dict) -> torch.Tensor:
    """Convolve x [B,C,H,W] with the level's aperture kernel (possibly on a coarser grid)."""
    s = level.scale
    k = aperture.ramp_kernel(level.radius / s, level.ramp / s, device=x.device, dtype=x.dtype)
    if flip:
        k = torch.flip(k, dims=(0, 1))
    if s == 1:
        return fft_convolve(x, k)
    h, w = x.shape[-2:]
    key = (s, h, w)
    if key not in resamplers:
        resamplers[key] = (_Resampler(h, s, x.device), _Resampler(w, s, x.device))
    ry, rx = resamplers[key]
    low = rx.splat(ry.splat(x, 2), 3) / float(s * s)
    low = fft_convolve(low, k)
    return rx.interpolate(ry.interpolate(low, 2), 3)


# ------------------------------------------------------------------------------------------------
# public API


def _clean_map(m: torch.Tensor, name: str) -> torch.Tensor:
    bad = ~torch.isfinite(m)
    if bad.any():
        out = m.clone()
        for b in range(m.shape[0]):
            if bad[b].all():
                raise InputError(f"{name} has no finite values; check the depth input.")
            if bad[b].any():
                out[b][bad[b]] = m[b][~bad[b]].median()
        log.warning("%s had %d NaN/infinite pixels; filled with the median of the rest.", name, int(bad.sum()))
        m = out
    return m


def _fit_map(m: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    if tuple(m.shape[-2:]) != tuple(size):
        log.warning("%s is %dx%d but the image is %dx%d: resizing it (bilinear) to the image size.",
                    name, m.shape[-1], m.shape[-2], size[1], size[0])
        m = resize_map(m, size)
    return m


def signed_radius_map(image_hw: tuple[int, int], batch: int, disparity=None, focus_disparity=None,
                      K: float = 0.0, defocus_px=None, device=None) -> torch.Tensor:
    """Signed CoC radius in px [B,H,W] from disparity + focus + K, or from a signed defocus map."""
    if defocus_px is not None:
        r = to_map_batch(defocus_px, "defocus map", batch=batch).to(device)
        if not torch.isfinite(r).all():
            raise InputError("Defocus map contains NaN or infinite values.")
        return _fit_map(r, image_hw, "Defocus map")
    K = check_blur_level(K)
    if disparity is None:
        if K == 0.0:
            return torch.zeros(batch, *image_hw, device=device)
        raise InputError("Give a disparity (or depth converted to disparity) map or a defocus map for blur.")
    disp = to_map_batch(disparity, "disparity", batch=batch).to(device)
    disp = _fit_map(_clean_map(disp, "Disparity map"), image_hw, "Disparity map")
    if focus_disparity is None:
        focus = focus_from(disp)
    else:
        focus = torch.as_tensor(focus_disparity, dtype=torch.float32, device=disp.device).flatten()
        if not torch.isfinite(focus).all():
            raise InputError(f"Focus disparity must be finite, got {focus_disparity}.")
        if focus.numel() not in (1, batch):
            raise InputError(f"Focus disparity: expected 1 or {batch} values, got {focus.numel()}.")
        focus = focus.expand(batch)
    return signed_coc(disp, focus, K)


def render_bokeh(image, disparity=None, focus_disparity=None, K: float = 0.0, aperture: Aperture | None = None,
                 *, defocus_px=None, colorspace: str = "srgb", highlight_boost: float = 0.0,
                 highlight_threshold: float = 0.9, max_radius: float | None = None,
                 level_step: float = LEVEL_STEP, flip_front: bool = True) -> torch.Tensor:
    """Refocus `image` [B,H,W,3] (anything `to_image_batch` takes) -> [B,H,W,3] in [0,1].

    Blur: either disparity [B,H,W] (1/m, bigger = nearer) + focus_disparity (scalar or [B]; None = the
    centre pixel) + K (px of CoC radius per unit of disparity), or defocus_px: a signed CoC radius map
    in px (> 0 in front of the focal plane, < 0 behind; an unsigned map is read as all in front).
    A disparity/defocus map of another size is resized to the image with a logged warning; NaN/inf
    disparity pixels are filled with the median (warning). K = 0 returns the image unchanged.
    aperture: an `apertures.Aperture` (None = circle). The shape is used as given behind the focal
    plane and turned by 180 degrees in front of it (as in a real lens) unless flip_front=False.
    colorspace: "srgb" (photos: blur in linear light) or "linear" (data already linear).
    highlight_boost: > 0 brightens near-white pixels (linear value above highlight_threshold) before
    blurring, by up to 1 + boost times, so clipped highlights bloom like the point lights they were.
    max_radius: cap on |r| in px (default: half the long edge); larger radii are capped with a warning.
    level_step: relative spacing of depth levels (smaller: crisper bokeh edges, slower).
    """
    img = to_image_batch(image)
    B, H, W, _ = img.shape
    device = img.device
    if colorspace not in ("srgb", "linear"):
        raise InputError(f"colorspace must be 'srgb' or 'linear', got {colorspace!r}.")
    if not (math.isfinite(float(highlight_boost)) and float(highlight_boost) >= 0):
        raise InputError(f"highlight_boost must be a number >= 0, got {highlight_boost}.")
    if not 0.0 <= float(highlight_threshold) < 1.0:
        raise InputError(f"highlight_threshold must be in [0, 1), got {highlight_threshold}.")
    aperture = aperture if aperture is not None else circle()
    if not isinstance(aperture, Aperture):
        raise InputError(f"aperture must be an Aperture (see genrefocus_core.apertures), got {type(aperture).__name__}.")

    radius = signed_radius_map((H, W), B, disparity, focus_disparity, K, defocus_px, device).to(torch.float32)
    cap = MAX_RADIUS_FRACTION * max(H, W) if max_radius is None else float(max_radius)
    if not (math.isfinite(cap) and cap >= 0):
        raise InputError(f"max_radius must be a finite number >= 0, got {max_radius}.")
    peak = float(radius.abs().max())
    if peak > cap:
        log.warning("Blur radius up to %.1f px exceeds the cap of %.1f px (max_radius; default half the "
                    "image's long edge): capped.", peak, cap)
        radius = radius.clamp(-cap, cap)
        peak = cap
    if peak < IN_FOCUS_RADIUS:
        return img.clone()

    levels = build_levels(peak, aperture, level_step)
    lo, w_lo, w_hi = level_weights(radius.abs(), levels)
    sign = torch.where(radius < 0, -1, 1)
    lo_signed = lo * sign
    hi_signed = (lo + 1) * sign

    x = img.permute(0, 3, 1, 2)  # [B,3,H,W]
    lin = srgb_to_linear(x) if colorspace == "srgb" else x
    if highlight_boost > 0:
        bright = lin.amax(dim=1, keepdim=True)
        t = ((bright - highlight_threshold) / (1.0 - highlight_threshold)).clamp(0, 1)
        t = t * t * (3 - 2 * t)
        blur_on = (radius.abs() - IN_FOCUS_RADIUS).clamp(0, 1)[:, None]
        lin = lin * (1.0 + float(highlight_boost) * t * blur_on)

    n = len(levels) - 1
    used = set(torch.unique(lo_signed[w_lo > 0]).tolist()) | set(torch.unique(hi_signed[w_hi > 0]).tolist())
    # accumulators: premultiplied colour (3), coverage (1), coverage from levels other than 0 (1)
    acc = torch.zeros(B, 5, H, W, dtype=lin.dtype, device=device)
    pending = torch.zeros_like(acc)
    resamplers: dict = {}
    for idx in range(-n, n + 1):
        if idx not in used:
            acc += pending
            pending.zero_()
            continue
        alpha = (torch.where(lo_signed == idx, w_lo, 0.0) + torch.where(hi_signed == idx, w_hi, 0.0))[:, None]
        layer = torch.cat([lin * alpha, alpha], dim=1)
        if idx != 0:
            layer = _blur_level(layer, levels[abs(idx)], aperture, flip_front and idx > 0, resamplers)
        cover = layer[:, 3:4]
        other = cover if idx != 0 else torch.zeros_like(cover)
        acc.mul_(1.0 - cover).add_(pending)
        pending = torch.cat([layer, other], dim=1)
    acc += pending

    out = acc[:, :3] / acc[:, 3:4].clamp_min(1e-6)
    out = linear_to_srgb(out) if colorspace == "srgb" else out.clamp(0.0, 1.0)
    keep = (radius.abs() < IN_FOCUS_RADIUS)[:, None] & (acc[:, 4:5].abs() < 1e-6)
    out = torch.where(keep, x, out)
    return out.permute(0, 2, 3, 1).contiguous()
