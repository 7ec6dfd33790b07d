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

from .apertures import Aperture, circle, vignetted
from .defocus import check_blur_level, focus_disparity as focus_from, signed_coc
from .errors import InputError
from .images import resize_map, to_image_batch, to_map_batch

log = logging.getLogger(__name__)

# Relative level spacing: delta(r) = max(1, r * LEVEL_STEP). Smaller = crisper edges, more levels.
LEVEL_STEP = 0.125
# Levels whose radius is >= 2 * COARSE_RADIUS * s render on an s-times coarser grid (edge ramp 2s px).
COARSE_RADIUS = 8.0
# quality -> (level_step, coarse_radius)
QUALITY_PRESETS = {"fast": (0.25, 4.0), "balanced": (LEVEL_STEP, COARSE_RADIUS), "best": (0.0625, 16.0)}
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


def build_levels(max_radius: float, aperture: Aperture, level_step: float = LEVEL_STEP,
                 coarse_radius: float = COARSE_RADIUS) -> list[Level]:
    """Unsigned level ladder covering [0, max_radius].

    Levels 1, 2, ... up to coarse_radius, then at least 2 px and level_step * r apart. A level is rendered on a grid `scale` times coarser
    (a power of two) once its radius on that grid stays >= coarse_radius; its edge ramp is then at least
    2 coarse pixels (so bilinear interpolation keeps the half-maximum outline exact) and the spacing to
    the next level grows to the ramp width. Ramp widths are >= the spacing to both neighbours.
    """
    if not 0.01 <= level_step <= 1.0:
        raise InputError(f"level_step must be in [0.01, 1], got {level_step}.")
    if not coarse_radius >= 2.0:
        raise InputError(f"coarse_radius must be >= 2, got {coarse_radius}.")
    levels = [Level(0.0, 0.0, 1, 1.0)]
    r = 1.0
    while True:
        scale = 1
        while r >= 2 * scale * coarse_radius:
            scale *= 2
        delta = max(1.0, r * level_step, 2.0 * scale if scale > 1 else (2.0 if r >= coarse_radius else 1.0))
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


# In the paired complex FFT of fft_convolve the last channel (coverage, the largest) is scaled down by
# this power of two, so its rounding noise does not swamp the dim colour channel it shares a transform
# with (point lights on black would otherwise gain a faint noise floor).
PAIRED_LAST_SCALE = 1.0 / 16.0
_KERNEL_SPECTRA: dict = {}
_KERNEL_CACHE_BYTES = 256 * 2 ** 20


def _kernel_spectrum(kernel: torch.Tensor, lh: int, lw: int, full: bool = False) -> torch.Tensor:
    """rfft2 (full: fft2) of the kernel centred at (0, 0) on an lh x lw grid (cached: levels repeat
    across calls)."""
    key = (kernel.shape[-1], lh, lw, full, kernel.dtype, str(kernel.device),
           hash(kernel.cpu().numpy().tobytes()))
    spec = _KERNEL_SPECTRA.get(key)
    if spec is None:
        k = kernel.shape[-1]
        p = k // 2
        kpad = torch.zeros(lh, lw, dtype=kernel.dtype, device=kernel.device)
        kpad[: k - p, : k - p] = kernel[p:, p:]
        kpad[: k - p, lw - p:] = kernel[p:, :p]
        kpad[lh - p:, : k - p] = kernel[:p, p:]
        kpad[lh - p:, lw - p:] = kernel[:p, :p]
        spec = torch.fft.fft2(kpad) if full else torch.fft.rfft2(kpad)
        used = sum(v.numel() * v.element_size() for v in _KERNEL_SPECTRA.values())
        if used + spec.numel() * spec.element_size() > _KERNEL_CACHE_BYTES:
            _KERNEL_SPECTRA.clear()
        _KERNEL_SPECTRA[key] = spec
    return spec


def fft_convolve(x: torch.Tensor, kernel: torch.Tensor, zero_margin: bool = False) -> torch.Tensor:
    """'Same'-size linear convolution of x [N,C,H,W] with an odd square kernel [k,k], zero outside.

    zero_margin: x is already zero within k//2 of its borders, so a circular convolution of x's own
    size is exact (no extra padding)."""
    k = kernel.shape[-1]
    if k == 1:
        return x * kernel.reshape(())
    n, c, h, w = x.shape
    p = 0 if zero_margin else k // 2
    lh, lw = _fast_size(max(h + p, k)), _fast_size(max(w + p, k))
    if c % 2 == 0:
        # channel pairs as real and imaginary parts of one complex image: the kernel is real, so the
        # two stay apart, and torch's complex FFTs beat its real-to-complex pair (~25% faster here)
        scale = torch.ones(c // 2, 1, 1, dtype=x.dtype, device=x.device)
        scale[-1] = PAIRED_LAST_SCALE
        spec = torch.fft.fft2(torch.complex(x[:, 0::2], x[:, 1::2] * scale), s=(lh, lw))
        spec *= _kernel_spectrum(kernel.to(x.dtype), lh, lw, full=True)
        y = torch.view_as_real(torch.fft.ifft2(spec))[..., :h, :w, :]  # [N, C/2, h, w, 2]
        y = y.movedim(-1, 2).reshape(n, c, h, w)
        y[:, -1] *= 1.0 / PAIRED_LAST_SCALE
        return y
    spec = torch.fft.rfft2(x, s=(lh, lw))
    spec *= _kernel_spectrum(kernel.to(x.dtype), lh, lw)
    return torch.fft.irfft2(spec, s=(lh, lw))[..., :h, :w]


def _phases(scale: int) -> list[float]:
    """Offsets of the `scale` fine samples of a coarse cell from the cell centre, in coarse cells."""
    return [(q + 0.5) / scale - 0.5 for q in range(scale)]


def _splat_dim(x: torch.Tensor, scale: int, dim: int, gain: float = 1.0) -> torch.Tensor:
    """Bilinear splat along dim 2 or 3 of [N,C,H,W] (the adjoint of bilinear interpolation with
    align_corners=False), times `gain`; that dim's length is a multiple of scale, one coarse cell per
    `scale` samples. Each fine sample goes to its own cell and, by its offset, to one neighbour."""
    cells = x.shape[dim] // scale
    xr = x.unflatten(dim, (cells, scale))
    shape = list(x.shape)
    shape[dim] = cells
    out = torch.zeros(shape, dtype=x.dtype, device=x.device)
    for q, d in enumerate(_phases(scale)):
        sample = xr.select(dim + 1, q)
        out.add_(sample, alpha=gain * (1.0 - abs(d)))
        if d > 0:  # towards the next cell
            out.narrow(dim, 1, cells - 1).add_(sample.narrow(dim, 0, cells - 1), alpha=gain * d)
        elif d < 0:
            out.narrow(dim, 0, cells - 1).add_(sample.narrow(dim, 1, cells - 1), alpha=-gain * d)
    return out


def _splat(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bilinear splat of x [N,C,h,w] onto a grid `scale` times coarser: the adjoint of `_upsample`.
    The coarse grid has one extra cell on each side, so nothing is clamped at the borders; splat then
    upsample keeps each pixel's energy (after dividing by scale^2) and its centroid."""
    n, c, h, w = x.shape
    hc, wc = -(-h // scale) + 2, -(-w // scale) + 2
    full = F.pad(x, (scale, wc * scale - w - scale, scale, hc * scale - h - scale))
    return _splat_dim(_splat_dim(full, scale, 2), scale, 3)


def _interpolate_dim(y: torch.Tensor, scale: int, dim: int, length: int) -> torch.Tensor:
    """Bilinear interpolation (align_corners=False) along dim 2 or 3 of a `_splat` grid, keeping the
    `length` fine samples after the leading coarse cell (they never reach the clamped border cells)."""
    m = y.shape[dim] - 2
    shape = list(y.shape)
    shape[dim] = m * scale
    out = torch.empty(shape, dtype=y.dtype, device=y.device)
    ov = out.unflatten(dim, (m, scale))
    for q, d in enumerate(_phases(scale)):
        if d >= 0:
            torch.lerp(y.narrow(dim, 1, m), y.narrow(dim, 2, m), d, out=ov.select(dim + 1, q))
        else:
            torch.lerp(y.narrow(dim, 0, m), y.narrow(dim, 1, m), 1.0 + d, out=ov.select(dim + 1, q))
    return out.narrow(dim, 0, length)


def _upsample(y: torch.Tensor, scale: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear interpolation (align_corners=False) of the coarse grid of `_splat` back to `size`."""
    return _interpolate_dim(_interpolate_dim(y, scale, 2, size[0]), scale, 3, size[1])


def _kernel(level: Level, aperture: Aperture, flip: bool, device, dtype) -> torch.Tensor:
    """The level's kernel on its grid. On a coarse grid the splat and the interpolation add a blur of
    variance about scale^2 / 3 per axis, which pulls a curved outline's half-maximum inwards by
    variance / (2 r); the kernel is drawn that much larger to compensate."""
    s = level.scale
    radius = level.radius + (s * s / (6.0 * level.radius) if s > 1 else 0.0)
    k = aperture.ramp_kernel(radius / s, level.ramp / s, device=device, dtype=dtype)
    return torch.flip(k, dims=(0, 1)) if flip else k


def _tile_view(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B,C,Hp,Wp] (Hp, Wp multiples of t) -> view [B, Hp/t, Wp/t, C, t, t]."""
    b, c, hp, wp = x.shape
    return x.view(b, c, hp // t, t, wp // t, t).permute(0, 2, 4, 1, 3, 5)


class _LevelRenderer:
    """Renders one depth level at a time, touching only the tiles where that level has pixels.

    Full-resolution levels are convolved tile by tile (FFT per tile with a halo, overlap-added into a
    canvas); coarse levels are gathered into a canvas, splatted to the coarse grid, convolved there and
    interpolated back. Each result is a canvas [B,4,h,w] (premultiplied RGB + coverage) placed at
    (y0, x0) in image coordinates, possibly reaching past the image borders.
    """

    BASE_TILE = 32
    PAD_TO = 128
    TILE_OVERHEAD = 600  # fixed cost of one tile in the tiled path, in units of one FFT-grid pixel

    def __init__(self, lin, lo_signed, hi_signed, w_lo, w_hi, levels, aperture, flip_front, regions=None):
        B, _, H, W = lin.shape
        self.regions = regions  # None, or [(y0, y1, x0, x1, aperture)] covering the image
        self.B, self.H, self.W = B, H, W
        self.levels, self.aperture, self.flip_front = levels, aperture, flip_front
        hp, wp = -(-H // self.PAD_TO) * self.PAD_TO, -(-W // self.PAD_TO) * self.PAD_TO
        # channels: linear RGB, lower/upper level weight, lower/upper signed level index; zero weights
        # in the padding
        self.data = torch.zeros(B, 7, hp, wp, dtype=lin.dtype, device=lin.device)
        self.data[:, :3, :H, :W] = lin
        for c, m in enumerate((w_lo, w_hi, lo_signed, hi_signed), start=3):
            self.data[:, c, :H, :W] = m
        big = float(10 ** 6)
        lo_min = torch.where(w_lo > 0, lo_signed.to(lin.dtype), big)
        hi_min = torch.where(w_hi > 0, hi_signed.to(lin.dtype), big)
        lo_max = torch.where(w_lo > 0, lo_signed.to(lin.dtype), -big)
        hi_max = torch.where(w_hi > 0, hi_signed.to(lin.dtype), -big)
        t = self.BASE_TILE
        mn = F.pad(torch.minimum(lo_min, hi_min)[:, None], (0, wp - W, 0, hp - H), value=big)
        mx = F.pad(torch.maximum(lo_max, hi_max)[:, None], (0, wp - W, 0, hp - H), value=-big)
        self.tile_min = -F.max_pool2d(-mn, t)[:, 0]
        self.tile_max = F.max_pool2d(mx, t)[:, 0]

    def _active_tiles(self, idx: int, tile: int) -> torch.Tensor:
        act = ((self.tile_min <= idx) & (self.tile_max >= idx)).to(self.data.dtype)
        m = tile // self.BASE_TILE
        if m > 1:
            act = F.max_pool2d(act[:, None], m)[:, 0]
        return (act > 0).nonzero()  # [N, 3]: batch, tile row, tile col

    def _layer_tiles(self, idx: int, tiles: torch.Tensor, tile: int) -> torch.Tensor:
        d = _tile_view(self.data, tile)[tiles[:, 0], tiles[:, 1], tiles[:, 2]]  # [N,7,t,t]
        alpha = (torch.where(d[:, 5] == idx, d[:, 3], 0.0) + torch.where(d[:, 6] == idx, d[:, 4], 0.0))[:, None]
        return torch.cat([d[:, :3] * alpha, alpha], dim=1)

    def render(self, idx: int):
        """-> (canvas [B,4,h,w], y0, x0) of level `idx` (signed), or None if it has no pixels."""
        level = self.levels[abs(idx)]
        dtype, device = self.data.dtype, self.data.device
        if idx != 0 and self.regions:
            tiles = self._active_tiles(idx, self.PAD_TO)
            return None if tiles.shape[0] == 0 else self._render_regions(idx, level, tiles, self.PAD_TO)
        if idx == 0 or level.scale == 1:
            kernel = None if idx == 0 else _kernel(level, self.aperture, self.flip_front and idx > 0, device, dtype)
            p = 0 if kernel is None else kernel.shape[-1] // 2
            tile = 32 if p <= 4 else (64 if p <= 16 else 128)
            tiles = self._active_tiles(idx, tile)
            if tiles.shape[0] == 0:
                return None
            ty, tx = tiles[:, 1], tiles[:, 2]
            bbox_h = (int(ty.max()) - int(ty.min()) + 1) * tile
            bbox_w = (int(tx.max()) - int(tx.min()) + 1) * tile
            if kernel is None:
                # identity level: one masked copy of the bounding box unless the tiles are sparse in it
                if 2 * tiles.shape[0] * tile * tile >= bbox_h * bbox_w:
                    return self._render_dense(idx, level, None, tiles, tile)
            else:
                # per-tile FFTs cost about twice as much per pixel as one big FFT, plus a fixed overhead
                dense_cost = _fast_size(bbox_h + 3 * p) * _fast_size(bbox_w + 3 * p)
                tile_cost = tiles.shape[0] * (2 * _fast_size(tile + 2 * p) ** 2 + self.TILE_OVERHEAD)
                if dense_cost < tile_cost:
                    return self._render_dense(idx, level, kernel, tiles, tile)
            layer = self._layer_tiles(idx, tiles, tile)
            if kernel is not None:
                size = _fast_size(tile + 2 * p)
                kpad = torch.zeros(size, size, dtype=dtype, device=device)
                kpad[: kernel.shape[0], : kernel.shape[1]] = kernel
                spec = torch.fft.rfft2(layer, s=(size, size)) * torch.fft.rfft2(kpad)
                layer = torch.fft.irfft2(spec, s=(size, size))[..., : tile + 2 * p, : tile + 2 * p]
            ty, tx = tiles[:, 1], tiles[:, 2]
            y0, x0 = int(ty.min()) * tile - p, int(tx.min()) * tile - p
            h = (int(ty.max()) + 1) * tile + p - y0
            w = (int(tx.max()) + 1) * tile + p - x0
            canvas = torch.zeros(self.B, 4, h, w, dtype=dtype, device=device)
            span = tile + 2 * p
            for n, (b, r, c) in enumerate(tiles.tolist()):
                ys, xs = r * tile - p - y0, c * tile - p - x0
                canvas[b, :, ys:ys + span, xs:xs + span] += layer[n]
            return canvas, y0, x0
        # coarse level: gather, splat, convolve on the coarse grid, interpolate back
        tile = self.PAD_TO
        tiles = self._active_tiles(idx, tile)
        if tiles.shape[0] == 0:
            return None
        kernel = _kernel(level, self.aperture, self.flip_front and idx > 0, device, dtype)
        return self._render_dense(idx, level, kernel, tiles, tile)

    def _render_regions(self, idx, level, tiles, tile):
        """Like `_render_dense`, but each image region is convolved with its own aperture (vignetting
        that changes across the frame); the pieces are summed into one canvas for the level."""
        ty, tx = tiles[:, 1], tiles[:, 2]
        by0, bx0 = int(ty.min()) * tile, int(tx.min()) * tile
        by1, bx1 = min((int(ty.max()) + 1) * tile, self.H), min((int(tx.max()) + 1) * tile, self.W)
        parts = []
        for ry0, ry1, rx0, rx1, ap in self.regions:
            y0, y1, x0, x1 = max(by0, ry0), min(by1, ry1), max(bx0, rx0), min(bx1, rx1)
            if y0 >= y1 or x0 >= x1:
                continue
            kernel = _kernel(level, ap, self.flip_front and idx > 0, self.data.device, self.data.dtype)
            parts.append(self._render_box(idx, level, kernel, y0, y1, x0, x1))
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        top = min(p[1] for p in parts)
        left = min(p[2] for p in parts)
        bottom = max(p[1] + p[0].shape[-2] for p in parts)
        right = max(p[2] + p[0].shape[-1] for p in parts)
        canvas = torch.zeros(self.B, 4, bottom - top, right - left, dtype=self.data.dtype, device=self.data.device)
        for c, y0, x0 in parts:
            canvas[:, :, y0 - top:y0 - top + c.shape[-2], x0 - left:x0 - left + c.shape[-1]] += c
        return canvas, top, left

    def _render_dense(self, idx, level, kernel, tiles, tile):
        ty, tx = tiles[:, 1], tiles[:, 2]
        by0, bx0 = int(ty.min()) * tile, int(tx.min()) * tile
        by1, bx1 = (int(ty.max()) + 1) * tile, (int(tx.max()) + 1) * tile
        return self._render_box(idx, level, kernel, by0, by1, bx0, bx1)

    def _render_box(self, idx, level, kernel, by0, by1, bx0, bx1):
        """Cut the bounding box of the level's tiles (with a margin for the blur) and convolve it whole,
        on the level's grid."""
        s = level.scale
        margin = 0 if kernel is None else kernel.shape[-1] // 2 * s + (2 * s if s > 1 else 0)
        d = self.data[:, :, by0:by1, bx0:bx1]
        h, w = by1 - by0 + 2 * margin, bx1 - bx0 + 2 * margin
        # on a coarse grid: one empty coarse cell before the content and whole cells throughout (see _splat)
        lead = s if s > 1 else 0
        ch = h if s == 1 else (-(-h // s) + 2) * s
        cw = w if s == 1 else (-(-w // s) + 2) * s
        if s == 1 and kernel is not None:
            # allocate the FFT grid at once (zero beyond the margin), so rfft2 needs no padded copy
            ch, cw = _fast_size(max(h, kernel.shape[-1])), _fast_size(max(w, kernel.shape[-1]))
        canvas = torch.zeros(self.B, 4, ch, cw, dtype=d.dtype, device=d.device)
        inner = canvas[:, :, lead + margin:lead + margin + by1 - by0, lead + margin:lead + margin + bx1 - bx0]
        alpha = inner[:, 3]
        torch.mul(d[:, 3], d[:, 5] == idx, out=alpha)
        alpha.addcmul_(d[:, 4], d[:, 6] == idx)
        torch.mul(d[:, :3], alpha[:, None], out=inner[:, :3])
        y0, x0 = by0 - margin, bx0 - margin
        if s == 1:
            if kernel is None:
                return canvas, y0, x0
            return fft_convolve(canvas, kernel, zero_margin=True)[..., :h, :w], y0, x0
        low = _splat_dim(_splat_dim(canvas, s, 2, 1.0 / (s * s)), s, 3)
        low = fft_convolve(low, kernel, zero_margin=True)
        return _upsample(low, s, (h, w)), y0, x0


def _clip(y0: int, x0: int, h: int, w: int, H: int, W: int):
    """Overlap of a canvas at (y0, x0) of size h x w with the image: (image slices, canvas slices)."""
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + h, H), min(x0 + w, W)
    if ya >= yb or xa >= xb:
        return None
    return (slice(ya, yb), slice(xa, xb)), (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))


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


VIGNETTING_GRID = 5


def _vignetting_regions(aperture: Aperture, strength: float, H: int, W: int):
    """Grid of image regions, each with the aperture clipped as seen from the region's centre."""
    strength = float(strength)
    if not (math.isfinite(strength) and 0.0 <= strength < 1.0):
        raise InputError(f"vignetting must be in [0, 1), got {strength}.")
    if strength == 0.0:
        return None
    n = VIGNETTING_GRID
    ys = [round(i * H / n) for i in range(n + 1)]
    xs = [round(i * W / n) for i in range(n + 1)]
    cy, cx, half_diag = H / 2.0, W / 2.0, math.hypot(H / 2.0, W / 2.0)
    regions = []
    for i in range(n):
        for j in range(n):
            if ys[i] >= ys[i + 1] or xs[j] >= xs[j + 1]:
                continue
            my, mx = (ys[i] + ys[i + 1]) / 2.0, (xs[j] + xs[j + 1]) / 2.0
            amount = strength * math.hypot(my - cy, mx - cx) / half_diag
            direction = math.degrees(math.atan2(cy - my, cx - mx))
            regions.append((ys[i], ys[i + 1], xs[j], xs[j + 1], vignetted(aperture, amount, direction)))
    return regions


def render_bokeh(image, disparity=None, focus_disparity=None, K: float = 0.0, aperture: Aperture | None = None,
                 *, defocus_px=None, colorspace: str = "srgb", highlight_boost: float = 0.0,
                 highlight_threshold: float = 0.9, max_radius: float | None = None,
                 quality: str = "balanced", flip_front: bool = True, vignetting: float = 0.0) -> torch.Tensor:
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
    vignetting: 0..1, cat's-eye bokeh towards the frame's edges: the aperture is clipped by an offset
    circle whose offset grows linearly from 0 at the centre to `vignetting` at the corners, pointing to
    the centre (rendered per region of a VIGNETTING_GRID x VIGNETTING_GRID grid).
    quality: "fast" | "balanced" | "best": depth-level spacing and when coarse grids take over
    (QUALITY_PRESETS); the CoC radius is equally exact in all three, the bokeh edges get crisper
    (edge ramp about 25% / 12% / 6% of the radius at large radii) and the render slower.
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

    if quality not in QUALITY_PRESETS:
        raise InputError(f"quality must be one of {', '.join(QUALITY_PRESETS)}, got {quality!r}.")
    levels = build_levels(peak, aperture, *QUALITY_PRESETS[quality])
    lo, w_lo, w_hi = level_weights(radius.abs(), levels)
    sign = torch.where(radius < 0, -1.0, 1.0)
    lo_signed = lo.to(torch.float32) * sign  # level indices are small integers: exact in float32
    hi_signed = lo_signed + sign
    del lo, sign

    x = img.permute(0, 3, 1, 2)  # [B,3,H,W]
    lin = srgb_to_linear(x) if colorspace == "srgb" else x
    if highlight_boost > 0:
        bright = lin.amax(dim=1, keepdim=True)
        t = ((bright - highlight_threshold) / (1.0 - highlight_threshold)).clamp(0, 1)
        t = t * t * (3 - 2 * t)
        blur_on = (radius.abs() - IN_FOCUS_RADIUS).clamp(0, 1)[:, None]
        lin = lin * (1.0 + float(highlight_boost) * t * blur_on)

    n = len(levels) - 1
    engine = _LevelRenderer(lin, lo_signed, hi_signed, w_lo, w_hi, levels, aperture, flip_front,
                            _vignetting_regions(aperture, vignetting, H, W))
    del lin, lo_signed, hi_signed, w_lo, w_hi  # the engine holds its own padded copy
    # accumulators: premultiplied colour (3), coverage (1), coverage from levels other than 0 (1)
    acc = torch.zeros(B, 5, H, W, dtype=torch.float32, device=device)
    pending = None  # the previous level: added after the current one has covered what lies behind

    def add(item):
        canvas, y0, x0, is_zero = item
        cl = _clip(y0, x0, canvas.shape[-2], canvas.shape[-1], H, W)
        if cl is None:
            return
        (iy, ix), (cy, cx) = cl
        acc[:, :4, iy, ix] += canvas[:, :, cy, cx]
        if not is_zero:
            acc[:, 4:5, iy, ix] += canvas[:, 3:4, cy, cx]

    whole = (slice(0, H), slice(0, W))
    for idx in range(-n, n + 1):
        res = engine.render(idx)
        cl = None if res is None else _clip(res[1], res[2], res[0].shape[-2], res[0].shape[-1], H, W)
        pcl = None if pending is None else _clip(pending[1], pending[2], pending[0].shape[-2],
                                                 pending[0].shape[-1], H, W)
        if cl is not None and pcl is not None and cl[0] == whole and pcl[0] == whole:
            # both cover the whole image: acc = acc * (1 - alpha) + pending in one pass
            (cy, cx), (py, px) = cl[1], pcl[1]
            keep = 1.0 - res[0][:, 3:4, cy, cx]
            prev = pending[0][:, :, py, px]
            torch.addcmul(prev, acc[:, :4], keep, out=acc[:, :4])
            if pending[3]:
                acc[:, 4:5] *= keep
            else:
                torch.addcmul(prev[:, 3:4], acc[:, 4:5], keep, out=acc[:, 4:5])
        else:
            if cl is not None:
                (iy, ix), (cy, cx) = cl
                acc[:, :, iy, ix] *= 1.0 - res[0][:, 3:4, cy, cx]
            if pending is not None:
                add(pending)
        pending = None if res is None else (res[0], res[1], res[2], idx == 0)
    if pending is not None:
        add(pending)

    out = acc[:, :3] / acc[:, 3:4].clamp_min(1e-6)
    out = linear_to_srgb(out) if colorspace == "srgb" else out.clamp(0.0, 1.0)
    keep = (radius.abs() < IN_FOCUS_RADIUS)[:, None] & (acc[:, 4:5].abs() < 1e-6)
    out = torch.where(keep, x, out)
    return out.permute(0, 2, 3, 1).contiguous()
