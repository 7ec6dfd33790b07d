"""Classical depth-of-field renderer: occlusion-aware layered compositing in linear light.

How it works (one pass per depth level, far to near):
1. The signed circle-of-confusion radius r = K * (disparity - focus) (px; > 0 in front of the focal
   plane) is cut into levels 0, +-1, +-2, ... 1 px apart up to 4 px (UNIT_STEP_RADIUS), then 2 px and
   about r / 8 apart. Each pixel's light is split
   between the two levels that bracket its radius, with weights chosen so that the half-maximum
   outline of the mixed point-spread function lies exactly at r (the kernels have linear edge ramps
   as wide as the level spacing; see `apertures.Aperture.ramp_kernel`). So the CoC radius is right to
   a small fraction of a pixel with a few dozen levels, not hundreds.
2. Each level (premultiplied linear colour + coverage, as two complex planes) is drawn straight from
   the frame over the box where its pixels lie (each pixel's two level keys are small integer maps;
   no sorting), weighted by each pixel's share for the level, and convolved with the
   aperture kernel at its radius: by FFT over the level's box plus the blur margin (one margin serves
   both sides where the light leaves the image), or by shifted sums for kernels of a few taps. Levels
   from 2 * COARSE_RADIUS px on (16 px by default) are rendered on a lattice coarser by a power of two
   (bilinear splat down, bilinear interpolation up, both preserving energy and position); this bounds
   cost and memory for any radius.
3. Levels are composited back to front with "over": a level hides what lies at least two levels
   behind it by its blurred coverage. So an in-focus surface receives no light from behind it, and a
   blurred foreground spills over a sharp background with its partial-occlusion alpha. Neighbouring
   levels (the same surface split in two) do not hide each other. Coarse levels are composited on their
   lattices (those behind the full-resolution ones "over", those in front "under", front to back with
   the transmittance), and each group crosses to full resolution once.
4. The sum is divided by the accumulated coverage (regions next to an occluder are extended with the
   visible surface behind, and image borders keep their brightness), then converted back to the input
   colour space. Pixels with |r| < 0.5 that receive no light from another level come back exactly.

Same torch code on CPU and CUDA; batched [B, H, W, 3].
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..basics.apertures import Aperture, circle, vignetted
from ..basics.defocus import IN_FOCUS_RADIUS, check_blur_level, resolve_focus, signed_coc
from ..basics.errors import InputError
from ..basics.files import check_fits_in_memory
from ..basics.images import fill_with_median, resize_map, to_image_batch, to_map_batch
from .grain import add_matched_grain

log = logging.getLogger(__name__)

# Relative level spacing at large radii: delta(r) >= r * LEVEL_STEP. Smaller = crisper edges, more levels.
LEVEL_STEP = 0.125
# Levels whose radius is >= 2 * COARSE_RADIUS * s render on an s-times coarser grid (edge ramp 2s px).
COARSE_RADIUS = 8.0
# Full-resolution levels are 1 px apart below this radius, 2 px (or more) from it on. A level's edge
# ramp is as wide as the spacing, so its flat top ends ramp / 2 inside its radius; from 4 px on, the
# flat top of the lower of two mixed levels still covers half the upper one's radius, so every mixed
# point-spread function from 2 px on keeps a flat core (its plateau) around the centre, whatever the
# shape (with 2-px steps from 2 px, a triangle or star at r = 3 loses its plateau and its corners).
UNIT_STEP_RADIUS = 4.0
# quality -> (level_step, coarse_radius, unit_step_radius)
QUALITY_PRESETS = {"fast": (0.25, 4.0, UNIT_STEP_RADIUS), "balanced": (LEVEL_STEP, COARSE_RADIUS, UNIT_STEP_RADIUS),
                   "best": (0.0625, 16.0, 16.0)}
# Radii are capped at this fraction of the image's long edge (a bigger blur is a uniform wash).
MAX_RADIUS_FRACTION = 0.5
# Peak working memory per pixel above the inputs, whatever K is (docs/classical.md "Memory": 250-310 B
# measured): checked against the free memory before a CPU render starts.
RENDER_BYTES_PER_PIXEL = 320
# Pixels with |r| below IN_FOCUS_RADIUS are in focus: copied exactly when the render differs from them
# by no more than EXACT_TOLERANCE (FFT rounding; light from other levels changes them by more).
EXACT_TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------------
# colour


# Frame-sized passes (colour, level weights, the output) run on bands of rows of about this many pixels.
# At 4K a frame-sized float temporary (33 MB) is beyond glibc's largest heap block (32 MiB), so it is
# mapped and page-faulted afresh for every operation; band-sized temporaries are reused from the heap.
BAND_PIXELS = 2 ** 20


def _row_bands(x: torch.Tensor) -> list[tuple]:
    """Indices of x [B,H,W,...] taking bands of its rows of about BAND_PIXELS pixels each (a tensor of
    fewer dimensions: all of it)."""
    if x.dim() < 3:
        return [(Ellipsis,)]
    B, H, W = x.shape[:3]
    rows = max(1, BAND_PIXELS // max(B * W, 1))
    return [(slice(None), slice(y, min(y + rows, H))) for y in range(0, H, rows)]


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB [B,H,W,C] -> linear light (a new tensor)."""
    out = torch.empty_like(x)
    for band in _row_bands(x):
        src, curve = x[band], out[band]
        # x^2.4 as exp2(2.4 log2 x): within 1e-7 of pow, at half its cost (pow was the dearest pass)
        torch.clamp_min(src, 0, out=curve).add_(0.055).div_(1.055).log2_().mul_(2.4).exp2_()
        torch.where(src <= 0.04045, src / 12.92, curve, out=curve)
    return out


def linear_to_srgb(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Linear light [B,H,W,C] -> sRGB in [0, 1]; inplace: into x (x is overwritten)."""
    out = x if inplace else torch.empty_like(x)
    for band in _row_bands(x):
        _linear_to_srgb_(x[band], out[band])
    return out


def _linear_to_srgb_(x: torch.Tensor, out: torch.Tensor) -> None:
    """linear_to_srgb of x into out (may be x itself, which is then clamped in place)."""
    lin = x.clamp_(0.0, 1.0) if out is x else x.clamp(0.0, 1.0)
    curve = lin.clamp_min(1e-12).log2_().mul_(1 / 2.4).exp2_().mul_(1.055).sub_(0.055)
    torch.where(lin <= 0.0031308, lin.mul_(12.92), curve, out=out)


# ------------------------------------------------------------------------------------------------
# levels


@dataclass(frozen=True)
class Level:
    radius: float   # circumradius in full-resolution pixels (0 = identity)
    ramp: float     # edge ramp width in full-resolution pixels (>= spacing to the neighbours)
    scale: int      # rendered on a grid `scale` times coarser
    plateau_norm: float  # 1 / (centre value of the level's PSF), full-resolution units


def build_levels(max_radius: float, aperture: Aperture, level_step: float = LEVEL_STEP,
                 coarse_radius: float = COARSE_RADIUS, unit_step: float = UNIT_STEP_RADIUS) -> list[Level]:
    """Unsigned level ladder covering [0, max_radius].

    Levels 1, 2, ... up to unit_step, then at least 2 px and level_step * r apart. A level is rendered on a grid `scale` times coarser (a power of two) once its radius on that grid stays >= coarse_radius; its edge ramp is then at least
    2 coarse pixels (so bilinear interpolation keeps the half-maximum outline exact) and the spacing to
    the next level grows to the ramp width. Ramp widths are >= the spacing to both neighbours.
    """
    if not 0.01 <= level_step <= 1.0:
        raise InputError(f"level_step must be in [0.01, 1], got {level_step}.")
    if not coarse_radius >= 2.0:
        raise InputError(f"coarse_radius must be >= 2, got {coarse_radius}.")
    unit_step = float(unit_step)
    levels = [Level(0.0, 0.0, 1, 1.0)]
    r = 1.0
    while True:
        scale = 1
        while r >= 2 * scale * coarse_radius:
            scale *= 2
        delta = max(1.0, r * level_step, 2.0 * scale if scale > 1 else (2.0 if r >= unit_step else 1.0))
        # plateau_norm = sum of the un-normalised kernel (its centre value is 1) times scale^2
        raw = aperture.ramp_kernel(r / scale, delta / scale, dtype=torch.float64, normalize=False)
        levels.append(Level(r, delta, scale, float(raw.sum()) * scale * scale))
        if r >= max_radius:
            break
        r += delta
    return levels


def level_weights(radius: torch.Tensor, levels: list[Level]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For r [B,H,W] (the sign is ignored) -> (lower level index of |r|, its weight, upper weight); upper
    index = lower + 1.

    Weights split the pixel's light so that the mixed PSF's half-maximum outline sits at |r|: with
    ramp values f1 = clamp(0.5 - (r - r1)/w1), f2 = clamp(0.5 + (r2 - r)/w2) at distance r, the centre
    heights a1, a2 must satisfy a1 (f1 - 0.5) + a2 (f2 - 0.5) = 0; light weights are e_i = a_i * norm_i.
    """
    dev = radius.device
    radii = torch.tensor([lv.radius for lv in levels], dtype=torch.float32, device=dev)
    lo = torch.empty(radius.shape, dtype=torch.int64, device=dev)
    w_lo, w_hi = (torch.empty(radius.shape, dtype=torch.float32, device=dev) for _ in range(2))
    # per interval (level i, i + 1): r1, 1 / w1, norm1, r2, 1 / w2, norm2
    table = torch.tensor([[lv.radius, 1.0 / max(lv.ramp, 1e-6), lv.plateau_norm] for lv in levels], dtype=torch.float32)
    table = torch.cat([table[:-1], table[1:]], dim=1).T.contiguous().to(dev)
    for band in _row_bands(radius):
        _level_weights_into(radius[band], levels, radii, table, lo[band], w_lo[band], w_hi[band])
    return lo, w_lo, w_hi


def _level_weights_into(radius, levels, radii, table, lo, w_lo, w_hi) -> None:
    n = len(levels) - 1
    r = radius.to(torch.float32).abs().clamp_(0.0, levels[-1].radius)
    index = torch.searchsorted(radii, r, right=True).sub_(1).clamp_(0, max(n - 1, 0))
    lo.copy_(index)
    if n == 0:
        w_lo.fill_(1.0)
        w_hi.zero_()
        return
    # since r1 <= r <= r2 and the ramps are at least the spacing,
    # a1 = f2 - 0.5 = min((r2 - r) / w2, 0.5), a2 = min((r - r1) / w1, 0.5)
    flat = index.flatten()
    r1, iw1, n1, r2, iw2, n2 = (column.index_select(0, flat).view(r.shape) for column in table)
    e1 = r2.sub_(r).mul_(iw2).clamp_max_(0.5).mul_(n1)
    e2 = torch.sub(r, r1).mul_(iw1).clamp_max_(0.5).mul_(n2)
    hi = e2.div_(e1.add_(e2).clamp_min_(1e-12))
    # between identity (level 0) and radius 1: in focus below 0.5, then a linear blend
    t = r.sub_(IN_FOCUS_RADIUS).div_(levels[1].radius - IN_FOCUS_RADIUS).clamp_(0.0, 1.0)
    torch.where(index == 0, t, hi, out=w_hi)
    torch.sub(1.0, w_hi, out=w_lo)


# ------------------------------------------------------------------------------------------------
# convolution


def _fast_size(n: int) -> int:
    """FFT length >= n that the FFT libraries (MKL, pocketfft, cuFFT) handle at full speed: prime factors
    at most 13 and, from 128 on, a multiple of 16 (measured on MKL: 528 = 16*33 transforms faster per
    pixel than 512 and much faster than 540 or 546; such sizes also sit close together)."""
    step = 16 if n >= 128 else 2
    m = max(-(-int(n) // step) * step, 2)
    while True:
        k = m
        for q in (2, 3, 5, 7, 11, 13):
            while k % q == 0:
                k //= q
        if k == 1:
            return m
        m += step


# A level's four real channels (premultiplied linear RGB + coverage) travel as two complex planes,
# (R + iG) and (B + iA), tensors [B, 2, h, w] complex: the kernel is real, so real and imaginary parts
# stay apart through the convolution, and two complex FFTs beat four real ones. The coverage is scaled
# by ALPHA_SCALE (a power of two, exact) so its rounding noise does not swamp the dim blue channel it
# shares a transform with (point lights on black would otherwise gain a faint noise floor); the
# accumulators keep that scale.
ALPHA_SCALE = 1.0 / 16.0
# Levels whose kernel has at most this many taps are convolved directly (shifted sums), not by FFT.
DIRECT_TAPS = 13
# A level whose pixels fill less than this fraction of their box is drawn from a list of its pixels.
SCATTERED_FILL = 0.125
# Up to this many such levels are picked out of the frame by one comparison each, more by one sort.
SCATTERED_KEYS_WITHOUT_SORT = 8
# Coarse levels of one lattice are transformed together, at most this many bytes of transforms at once.
COARSE_BATCH_BYTES = 96 * 2 ** 20
_KERNEL_SPECTRA: dict = {}
_DFT_TABLES: dict = {}
_KERNEL_CACHE_BYTES = 64 * 2 ** 20  # spectra are cheap to remake (DFT products): keep RAM for the user
_CACHE_LOCK = threading.Lock()  # levels render on worker threads (`_rendered`)


def _dft_columns(n: int, p: int, device) -> torch.Tensor:
    """[n, 2p+1] complex64: exp(-2 pi i u d / n) for frequencies u and offsets d = -p..p (cached)."""
    key = (n, str(device))
    with _CACHE_LOCK:
        table = _DFT_TABLES.get(key)
    if table is None or (table.shape[1] - 1) // 2 < p:
        reach = max(p, 16 if table is None else 2 * ((table.shape[1] - 1) // 2))
        d = torch.arange(-reach, reach + 1, dtype=torch.int64, device=device)
        turns = torch.outer(torch.arange(n, dtype=torch.int64, device=device), d).remainder_(n).to(torch.float64)
        table = torch.polar(torch.ones_like(turns), turns.mul_(-2.0 * math.pi / n)).to(torch.complex64)
        with _CACHE_LOCK:
            if len(_DFT_TABLES) >= 64:
                _DFT_TABLES.clear()
            _DFT_TABLES[key] = table
    reach = (table.shape[1] - 1) // 2
    return table[:, reach - p: reach + p + 1]


# FFTs run on groups of planes of at most this many bytes, for the reason of BAND_PIXELS: a 1120 x 1936
# pair of planes took twice as long in one call as plane by plane (same values).
FFT_GROUP_BYTES = 16 * 2 ** 20


def _fft2_(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """2-D FFT (or inverse) of the contiguous complex planes x [..., h, w] in place, a group at a time."""
    planes = x.view(-1, *x.shape[-2:])
    per_group = max(1, FFT_GROUP_BYTES // (planes[0].numel() * planes.element_size()))
    transform = torch.fft.ifft2 if inverse else torch.fft.fft2
    for i in range(0, planes.shape[0], per_group):
        group = planes[i:i + per_group]
        transform(group, out=group)
    return x


def _kernel_spectrum(kernel: torch.Tensor, lh: int, lw: int) -> torch.Tensor:
    """2-D DFT [lh, lw] (complex) of the kernel centred at (0, 0), cached: levels repeat across calls.
    The kernel is small, so it is two matrix products with DFT columns (several times cheaper than
    an FFT of the zero-padded kernel)."""
    key = (kernel.shape[-1], lh, lw, kernel.dtype, str(kernel.device), hash(kernel.cpu().numpy().tobytes()))
    spec = _KERNEL_SPECTRA.get(key)
    if spec is None:
        p = kernel.shape[-1] // 2
        ey, ex = _dft_columns(lh, p, kernel.device), _dft_columns(lw, p, kernel.device)
        spec = ey @ kernel.to(torch.complex64) @ ex.T
        with _CACHE_LOCK:
            used = sum(v.numel() * v.element_size() for v in _KERNEL_SPECTRA.values())
            if used + spec.numel() * spec.element_size() > _KERNEL_CACHE_BYTES:
                _KERNEL_SPECTRA.clear()
            _KERNEL_SPECTRA[key] = spec
    return spec


def resampling_variance(scale: int) -> float:
    """Per-axis variance (fine px^2, mean over the fine phases) of the blur a coarse level picks up: the
    bilinear splat onto a lattice `scale` times coarser, then bilinear 2x interpolations back to full
    resolution. A sample at distance d (in cells) from a cell centre is shared d : 1 - d between two
    cells: a spread of variance d (1 - d) cells^2."""
    def cell_variance(factor: int) -> float:  # samples of a lattice `factor` times finer, in cells^2
        return sum(abs((q + 0.5) / factor - 0.5) * (1.0 - abs((q + 0.5) / factor - 0.5))
                   for q in range(factor)) / factor
    var = cell_variance(scale) * scale * scale  # the splat onto cells of `scale` px
    cell = scale
    while cell > 1:  # each 2x interpolation, from cells of `cell` px to cells of cell / 2
        var += cell_variance(2) * cell * cell
        cell //= 2
    return var


def _kernel(level: Level, aperture: Aperture, device) -> torch.Tensor:
    """The level's kernel on its grid. On a coarse grid the resampling blur (`resampling_variance`) pulls
    a curved outline's half-maximum inwards by about variance / (2 r); the kernel is drawn that much
    larger to compensate."""
    s = level.scale
    radius = level.radius + (resampling_variance(s) / (2.0 * level.radius) if s > 1 else 0.0)
    return aperture.ramp_kernel(radius / s, level.ramp / s, device=device, dtype=torch.float32)




def _channels(planes: torch.Tensor) -> torch.Tensor:
    """Complex planes [B,2,h,w] -> real view [B,2,h,w,2]; RGBA channel c is [:, c // 2, ..., c % 2]."""
    return torch.view_as_real(planes)


def _transmittance(planes: torch.Tensor) -> torch.Tensor:
    """1 - coverage [B,h,w] of complex planes, in one pass."""
    return torch.rsub(planes[:, 1].imag, 1.0, alpha=1.0 / ALPHA_SCALE)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """[B,h,w] real -> [B,1,h,w,2] with each value twice, to scale both parts of complex planes in one
    contiguous pass (a broadcast over the size-2 axis is several times slower on CPU)."""
    return torch.view_as_real(torch.complex(x, x))[:, None]


def _planar(planes: torch.Tensor) -> torch.Tensor:
    """Complex planes [B,2,h,w] -> real [B,4,h,w] RGBA (a copy)."""
    B, _, h, w = planes.shape
    return _channels(planes).permute(0, 1, 4, 2, 3).reshape(B, 4, h, w)


def _from_planar(x: torch.Tensor) -> torch.Tensor:
    """Real [B,4,h,w] RGBA -> complex planes [B,2,h,w]."""
    return torch.complex(x[:, 0::2], x[:, 1::2])


@dataclass(frozen=True)
class _Grid:
    """A lattice of h x w cells `scale` image pixels wide; cell (0, 0) starts at image pixel (y0, x0).
    Coarse lattices of all scales share (y0, x0), a multiple of every scale, so interpolating one by 2x
    lands on the cells of the next. Levels are convolved on an fft_h x fft_w circular grid whose
    cells beyond h, w take the blur leaving the kept part on either side (it is not needed there)."""
    scale: int
    y0: int
    x0: int
    h: int
    w: int
    fft_h: int = 0
    fft_w: int = 0


@dataclass
class LevelCanvas:
    """A rendered full-resolution level: complex planes [B,2,h,w] whose pixel (0, 0) is image pixel
    (y0, x0); it may reach past the image borders."""
    planes: torch.Tensor
    y0: int
    x0: int

    def clip(self, H: int, W: int):
        """(image slices, canvas slices) of the overlap with an H x W image, or None."""
        h, w = self.planes.shape[2], self.planes.shape[3]
        ya, xa = max(self.y0, 0), max(self.x0, 0)
        yb, xb = min(self.y0 + h, H), min(self.x0 + w, W)
        if ya >= yb or xa >= xb:
            return None
        return (slice(ya, yb), slice(xa, xb)), (slice(ya - self.y0, yb - self.y0), slice(xa - self.x0, xb - self.x0))


@dataclass
class _LevelPixels:
    """The pixels that send light to one level: the box of the frame around them (rows y0:y1, columns
    x0:x1, tight), and either (dense) the linear colour there with each pixel's weight for this level
    (0 for the box's pixels of other levels), or (scattered) the list of the level's pixels with their
    light."""
    y0: int
    y1: int
    x0: int
    x1: int
    lin: torch.Tensor | None = None     # [B,h,w,3], a view of the frame
    weight: torch.Tensor | None = None  # [B,h,w]
    entries: tuple | None = None        # (batch or None, row, column, complex planes' values [E, 2])

    def draw(self, dst: torch.Tensor) -> None:
        """Write the level's light into complex planes dst [B,2,h,w] (every value of it):
        (R w + i G w, B w + i A w) with A = ALPHA_SCALE, 0 where the level has no pixel."""
        if self.entries is not None:
            b, y, x, vals = self.entries
            dst.zero_()
            y, x = y - self.y0, x - self.x0
            for plane in range(2):
                if b is None:  # a single frame
                    dst[0, plane].index_put_((y, x), vals[:, plane])
                else:
                    dst[:, plane].index_put_((b, y, x), vals[:, plane])
            return
        real, w = torch.view_as_real(dst), self.weight
        torch.mul(self.lin[..., 0:2], w[..., None], out=real[:, 0])
        torch.mul(self.lin[..., 2], w, out=real[:, 1, ..., 0])
        torch.mul(w, ALPHA_SCALE, out=real[:, 1, ..., 1])


def _zeros_around(B: int, h: int, w: int, pix: _LevelPixels, oy: int, ox: int, device) -> torch.Tensor:
    """Complex planes [B,2,h,w] holding the level's pixels drawn at (oy, ox) and zeros elsewhere: only
    the part around the drawing is zeroed (one pass over the grid instead of two)."""
    planes = torch.empty(B, 2, h, w, dtype=torch.complex64, device=device)
    y1, x1 = oy + pix.y1 - pix.y0, ox + pix.x1 - pix.x0
    planes[:, :, :oy].zero_()
    planes[:, :, y1:].zero_()
    planes[:, :, oy:y1, :ox].zero_()
    planes[:, :, oy:y1, x1:].zero_()
    pix.draw(planes[:, :, oy:y1, ox:x1])
    return planes


class _LevelRenderer:
    """Renders one depth level at a time, drawing it straight from the frame.

    Every pixel sends its light to the two levels that bracket its radius. Each pixel's two level keys
    (signed level + n) are kept as small integer maps; a level is drawn from the box of the frame where
    its key occurs (found from each row's and column's range of keys, then tightened), weighting each
    pixel by its share for that level: dense passes over the box, no sorting or scattering of pixels.
    A full-resolution level is drawn into a zero canvas covering its pixels plus the blur margin; a
    coarse level is bilinearly splatted onto the shared lattice of its scale. Either is convolved with
    the aperture kernel by FFT.
    """

    def __init__(self, lin, level_lo, w_lo, w_hi, sign, levels, aperture, flip_front, regions=None):
        B, H, W, _ = lin.shape
        self.B, self.H, self.W, self.device = B, H, W, lin.device
        self.levels, self.aperture, self.flip_front, self.regions = levels, aperture, flip_front, regions
        n = len(levels) - 1
        self.n = n
        self.lin, self.weights = lin, (w_lo, w_hi)
        # keys: signed level + n of the lower and the upper level, or `skip` where the weight is 0
        skip = 2 * n + 1
        key_type = torch.uint8 if skip < 256 else torch.int16
        lo = level_lo.to(torch.int16).mul_(sign).add_(n)
        hi = lo + sign
        self.keys = (lo.masked_fill_(w_lo <= 0, skip).to(key_type), hi.masked_fill_(w_hi <= 0, skip).to(key_type))
        # each key's box: the rows and the columns where it occurs (over both maps and the batch)
        self.boxes, occurrences = _key_boxes(self.keys, skip)
        # keys whose pixels fill little of their box (depth that jumps from pixel to pixel) are drawn from
        # lists of their pixels, whose cost follows the pixels rather than the box
        scattered = [q for q, box in enumerate(self.boxes)
                     if box is not None and occurrences[q] < SCATTERED_FILL * B * (box[1] - box[0]) * (box[3] - box[2])]
        self.scattered = _scattered_entries(lin, self.keys, self.weights, scattered, occurrences) if scattered else {}
        self._kernels = {}
        # image rows and columns (y0, y1, x0, x1) outside which a rendered coarse level has no light or
        # coverage (None: anywhere), filled in as the levels render
        self.supports = {}
        # the coarse lattices: the image plus a context of `lead` px on each side, sharing one origin
        coarse = [lv for lv in levels if lv.scale > 1]
        self.grids = {}
        if coarse:
            lead = 2 * max(lv.scale for lv in coarse)
            for s in sorted({lv.scale for lv in coarse}):
                # kernel reach in cells (the same for every shape at a radius; see ramp_kernel)
                reach = max(self.kernel(lv, aperture).shape[-1] // 2 for lv in coarse if lv.scale == s)
                h, w = -(-(H + 2 * lead) // s) + 1, -(-(W + 2 * lead) // s) + 1
                # light splatted into cells [0, h) spreads `reach` cells; what leaves on either side
                # wraps into cells [h, fft_h), which nobody reads
                self.grids[s] = _Grid(s, -lead, -lead, h, w, _fast_size(h + reach + 1), _fast_size(w + reach + 1))

    def kernel(self, level: Level, aperture: Aperture) -> torch.Tensor:
        key = (level, id(aperture))
        if key not in self._kernels:
            self._kernels[key] = _kernel(level, aperture, self.device)
        return self._kernels[key]

    def spectrum(self, level: Level, aperture: Aperture, flip: bool, lh: int, lw: int) -> torch.Tensor:
        """Kernel spectrum of a level; the shape turned by 180 degrees (flip) has the conjugate spectrum."""
        spec = _kernel_spectrum(self.kernel(level, aperture), lh, lw)
        return spec.conj() if flip else spec

    def _pixels(self, idx: int, region=None) -> _LevelPixels | None:
        """Level idx's pixels (within `region`, image rows and columns y0, y1, x0, x1), or None."""
        box = self.boxes[idx + self.n]
        if box is None:
            return None
        if idx + self.n in self.scattered:
            return self._scattered_pixels(idx + self.n, box, region)
        y0, y1, x0, x1 = box
        if region is not None:  # the part of the box in the region, tightened around the pixels there
            y0, y1, x0, x1 = max(y0, region[0]), min(y1, region[1]), max(x0, region[2]), min(x1, region[3])
            if y0 >= y1 or x0 >= x1:
                return None
        lo, hi = (k[:, y0:y1, x0:x1] == idx + self.n for k in self.keys)
        if region is not None:
            mine = (lo | hi).view(torch.uint8)  # max of bytes: many times faster than any() on CPU
            rows = mine.amax(dim=(0, 2)).nonzero()
            if rows.numel() == 0:
                return None
            cols = mine.amax(dim=(0, 1)).nonzero()
            ya, yb, xa, xb = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            lo, hi = lo[:, ya:yb, xa:xb], hi[:, ya:yb, xa:xb]
            y0, y1, x0, x1 = y0 + ya, y0 + yb, x0 + xa, x0 + xb
        w_lo, w_hi = (w[:, y0:y1, x0:x1] for w in self.weights)
        weight = torch.where(lo, w_lo, torch.where(hi, w_hi, 0.0))
        return _LevelPixels(y0, y1, x0, x1, self.lin[:, y0:y1, x0:x1], weight)

    def _scattered_pixels(self, key: int, box, region) -> _LevelPixels | None:
        ent = self.scattered[key]
        if region is None:
            return _LevelPixels(*box, entries=ent)
        y0, y1, x0, x1 = region
        y, x = ent[1], ent[2]
        inside = ((y >= y0) & (y < y1) & (x >= x0) & (x < x1)).nonzero().flatten()
        if inside.numel() == 0:
            return None
        ent = tuple(None if t is None else t.index_select(0, inside) for t in ent)
        y, x = ent[1], ent[2]
        return _LevelPixels(int(y.min()), int(y.max()) + 1, int(x.min()), int(x.max()) + 1, entries=ent)

    def _parts(self, idx: int):
        """[(entries, aperture)] of a level: the whole level, or one part per vignetting region."""
        if not self.regions:
            pix = self._pixels(idx)
            return [] if pix is None else [(pix, self.aperture)]
        parts = []
        for y0, y1, x0, x1, ap in self.regions:
            pix = self._pixels(idx, (y0, y1, x0, x1))
            if pix is not None:
                parts.append((pix, ap))
        return parts

    def render(self, idx: int) -> LevelCanvas | None:
        """A full-resolution level (scale 1) as a canvas, or None if it has no pixels."""
        level = self.levels[abs(idx)]
        if idx == 0:  # in focus: drawn as is
            pix = self._pixels(0)
            if pix is None:
                return None
            planes, y0, x0, h, w = self._draw_fine(pix, 0, fft=False)
            return LevelCanvas(planes, y0, x0)
        canvases = []
        flip = self.flip_front and idx > 0
        for pix, ap in self._parts(idx):
            kernel = self.kernel(level, ap)
            p = kernel.shape[-1] // 2
            if int((kernel > 0).sum()) <= DIRECT_TAPS:
                canvases.append(self._convolve_direct(pix, torch.flip(kernel, dims=(0, 1)) if flip else kernel))
                continue
            planes, y0, x0, h, w = self._draw_fine(pix, p)
            spec = _fft2_(planes)  # in place: one frame-sized buffer per level
            spec *= self.spectrum(level, ap, flip, *planes.shape[-2:])
            canvases.append(LevelCanvas(_fft2_(spec, inverse=True)[..., :h, :w], y0, x0))
        return _sum_canvases(canvases, self.B)

    def _convolve_direct(self, pix: _LevelPixels, kernel: torch.Tensor) -> LevelCanvas:
        """Convolution with a kernel of a few taps as shifted sums: cheaper than two FFTs of the frame."""
        p = kernel.shape[-1] // 2
        src, y0, x0, bh, bw = self._draw_fine(pix, 0, fft=False)  # the entries' box, no margin
        out = torch.zeros(self.B, 2, bh + 2 * p, bw + 2 * p, dtype=src.dtype, device=src.device)
        for dy, dx in (kernel > 0).nonzero().tolist():
            out[:, :, dy:dy + bh, dx:dx + bw].add_(src, alpha=float(kernel[dy, dx]))
        return LevelCanvas(out, y0 - p, x0 - p)

    def _draw_fine(self, pix: _LevelPixels, margin: int, fft: bool = True):
        """The level's pixels drawn into a zero grid for a circular convolution with a kernel reaching
        `margin` px. Only the blur that lands inside the image is kept, so where the pixels' box (plus
        margin) meets an image border, the light leaving the image may wrap around into the grid's far
        margin: one margin serves both sides there. -> (planes [B,2,gh,gw], image row and column of grid
        cell (0, 0), height and width of the useful part)."""
        def axis(c0, c1, size):
            n0, n1 = max(c0 - margin, 0), min(c1 + margin, size)  # the part of the blur we keep
            need = max(c1 - n0, n1 - c0) + margin  # no wrapped light may reach the kept part
            return n0, n1 - n0, (_fast_size(need) if fft else need)

        y0, h, gh = axis(pix.y0, pix.y1, self.H)
        x0, w, gw = axis(pix.x0, pix.x1, self.W)
        planes = _zeros_around(self.B, gh, gw, pix, pix.y0 - y0, pix.x0 - x0, self.device)
        return planes, y0, x0, h, w

    def render_coarse(self, idx: int) -> torch.Tensor | None:
        """A coarse level on its scale's shared lattice: complex planes [B,2,grid.h,grid.w], or None."""
        level = self.levels[abs(idx)]
        grid = self.grids[level.scale]
        parts = self._parts(idx)
        if not parts:
            return None
        self.supports[idx] = None
        lh, lw = grid.fft_h, grid.fft_w
        spec = None
        for pix, ap in parts:
            planes = torch.zeros(self.B, 2, lh, lw, dtype=torch.complex64, device=self.device)
            self._splat(pix, grid, planes)
            part = _fft2_(planes)
            part *= self.spectrum(level, ap, self.flip_front and idx > 0, lh, lw)
            spec = part if spec is None else spec.add_(part)
        return _fft2_(spec, inverse=True)[..., : grid.h, : grid.w]

    def render_coarse_run(self, indices: list[int]) -> list[torch.Tensor | None]:
        """`render_coarse` of several levels on one lattice, consecutive in idx: splatted level by level
        into one batch and convolved by batched FFTs (in chunks of at most COARSE_BATCH_BYTES of
        transforms)."""
        if self.regions:
            return [self.render_coarse(i) for i in indices]
        grid = self.grids[self.levels[abs(indices[0])].scale]
        lh, lw = grid.fft_h, grid.fft_w
        per_level = self.B * 2 * lh * lw * 8  # a level's planes (transformed in place)
        step = max(1, COARSE_BATCH_BYTES // per_level)
        order = sorted(i for i in indices if self.boxes[i + self.n] is not None)  # the levels with pixels
        out = {}
        for c0 in range(0, len(order), step):
            chunk = order[c0:c0 + step]
            planes = torch.zeros(len(chunk) * self.B, 2, lh, lw, dtype=torch.complex64, device=self.device)
            for k, i in enumerate(chunk):
                cells = self._splat(self._pixels(i), grid, planes[k * self.B:(k + 1) * self.B])
                self.supports[i] = self._support(cells, grid, self.levels[abs(i)])
            spec = _fft2_(planes).view(len(chunk), self.B, 2, lh, lw)
            for k, i in enumerate(chunk):
                spec[k] *= self.spectrum(self.levels[abs(i)], self.aperture, self.flip_front and i > 0, lh, lw)
            res = _fft2_(spec, inverse=True)[..., : grid.h, : grid.w]
            for k, i in enumerate(chunk):
                out[i] = res[k]
        return [out.get(i) for i in indices]

    @staticmethod
    def _splat(pix: _LevelPixels, grid: _Grid, planes: torch.Tensor) -> tuple[int, int, int, int]:
        """Bilinear splat of the level's pixels onto the lattice, added into planes [B,2,lh,lw] (the adjoint
        of bilinear interpolation with align_corners=False, so splat + interpolation keeps each pixel's
        energy and centroid). The pixels are drawn at full resolution into their box, aligned to whole
        cells, and the box is reduced cell by cell with the splat's weights (`_splat_reduce`): dense
        passes over the box cost far less than scattering every pixel into four cells.
        -> the lattice cells written, (cy0, cy1, cx0, cx1)."""
        s = grid.scale
        by0, by1 = (pix.y0 - grid.y0) // s, (pix.y1 - 1 - grid.y0) // s + 1  # cells of the box
        bx0, bx1 = (pix.x0 - grid.x0) // s, (pix.x1 - 1 - grid.x0) // s + 1
        oy, ox = pix.y0 - (grid.y0 + by0 * s), pix.x0 - (grid.x0 + bx0 * s)
        box = _zeros_around(planes.shape[0], (by1 - by0) * s, (bx1 - bx0) * s, pix, oy, ox, planes.device)
        planes[:, :, by0 - 1:by1 + 1, bx0 - 1:bx1 + 1] += _splat_reduce(box, s)
        return by0 - 1, by1 + 1, bx0 - 1, bx1 + 1

    def _support(self, cells, grid: _Grid, level: Level):
        """Image rows and columns (y0, y1, x0, x1) that a coarse level splatted into lattice cells
        [cy0, cy1) x [cx0, cx1) reaches: the kernel's reach, plus two cells for the bilinear steps back to
        full resolution (one cell of the lattice, half a cell of the next, ...)."""
        cy0, cy1, cx0, cx1 = cells
        reach = self.kernel(level, self.aperture).shape[-1] // 2 + 2
        s = grid.scale
        return (grid.y0 + (cy0 - reach) * s, grid.y0 + (cy1 + reach) * s,
                grid.x0 + (cx0 - reach) * s, grid.x0 + (cx1 + reach) * s)


def _key_boxes(keys, count: int) -> tuple[list[tuple[int, int, int, int] | None], list[int]]:
    """For each key 0..count-1 of the integer maps `keys` ([B,H,W] each): (y0, y1, x0, x1), the rows and
    columns where it occurs in any map and frame, or None; and how often it occurs. One histogram of
    (key, row) and one of (key, column) per map: a few passes over the maps whatever the number of keys."""
    B, H, W = keys[0].shape
    spans, occurrences = [], None
    for size, position in ((H, torch.arange(H, dtype=torch.int32, device=keys[0].device).view(1, H, 1)),
                           (W, torch.arange(W, dtype=torch.int32, device=keys[0].device).view(1, 1, W))):
        hits = sum(torch.bincount(k.to(torch.int32).mul_(size).add_(position).flatten(), minlength=(count + 1) * size)
                   for k in keys)
        if occurrences is None:
            occurrences = hits[: count * size].view(count, size).sum(dim=1).tolist()
        present = hits[: count * size].view(count, size) > 0
        first = present.to(torch.uint8).argmax(dim=1)
        last = size - present.flip(1).to(torch.uint8).argmax(dim=1)
        spans.append((present.any(dim=1).tolist(), first.tolist(), last.tolist()))
    (found, y0, y1), (_, x0, x1) = spans
    return [(y0[q], y1[q], x0[q], x1[q]) if found[q] else None for q in range(count)], occurrences


def _scattered_entries(lin, keys, weights, wanted: list[int], occurrences: list[int]) -> dict:
    """The pixels of the keys `wanted` as lists: {key: (batch or None, row, column, complex planes' values
    [E, 2])}, given how often each key occurs (`_key_boxes`). Entry i of both maps together is pixel
    i mod N, of the lower map for i < N. A few keys are picked by one comparison each; more by sorting the
    2N entries by key once, after which each key's entries are a contiguous run. They are gathered with
    their light (the same products as a dense drawing)."""
    B, H, W, _ = lin.shape
    N = B * H * W
    flat = torch.cat([k.flatten() for k in keys])
    if len(wanted) <= SCATTERED_KEYS_WITHOUT_SORT:  # a few keys: one comparison pass each beats a sort
        picked = torch.cat([(flat == q).nonzero().flatten() for q in wanted])
    else:
        order = torch.argsort(flat, stable=True)  # the keys of absent weights sort last
        starts = [0]
        for c in occurrences:
            starts.append(starts[-1] + c)
        picked = torch.cat([order[starts[q]:starts[q + 1]] for q in wanted])
        del order
    del flat
    pixel = picked.remainder(N)
    weight = torch.cat([w.flatten() for w in weights]).index_select(0, picked)
    values = torch.empty(picked.numel(), 4, dtype=torch.float32, device=lin.device)
    torch.mul(lin.reshape(N, 3).index_select(0, pixel), weight[:, None], out=values[:, :3])
    torch.mul(weight, ALPHA_SCALE, out=values[:, 3])
    values = values.view(torch.complex64)  # [E, 2]: (R w + i G w, B w + i A w)
    row = pixel // W
    x = pixel - row * W
    b = row // H if B > 1 else None
    y = row - b * H if B > 1 else row
    out, a = {}, 0
    for q in wanted:
        e = a + occurrences[q]
        out[q] = (None if b is None else b[a:e], y[a:e], x[a:e], values[a:e])
        a = e
    return out


def _splat_phases(scale: int, device) -> torch.Tensor:
    """[scale, 3] complex: the bilinear splat weight (over scale, one axis) of a pixel at phase q of its
    cell onto the cell before, its own and the one after. Its offset from its cell's centre in cells
    is f - 0.5 (f = (q + 0.5) / scale); the nearer neighbour gets |f - 0.5|, its own cell the rest."""
    w = torch.zeros(scale, 3, dtype=torch.float64)
    for q in range(scale):
        f = (q + 0.5) / scale
        side = 0 if f < 0.5 else 2
        w[q, side] = abs(f - 0.5)
        w[q, 1] = 1.0 - abs(f - 0.5)
    return (w / scale).to(device=device, dtype=torch.complex64)


def _splat_reduce(box: torch.Tensor, scale: int) -> torch.Tensor:
    """Complex planes [..., h*scale, w*scale] of whole cells -> their bilinear splat [..., h+2, w+2] onto
    the cells, one cell of spill on each side (separable: along x, then along y)."""
    phases = _splat_phases(scale, box.device)
    *lead, hs, ws = box.shape
    h, w = hs // scale, ws // scale
    px = box.view(*lead, hs, w, scale) @ phases  # [..., hs, w, 3]: to the cell before, own, after
    cols = torch.zeros(*lead, hs, w + 2, dtype=box.dtype, device=box.device)
    for k in range(3):
        cols[..., k:k + w] += px[..., k]
    py = phases.T @ cols.view(*lead, h, scale, w + 2)  # [..., h, 3, w + 2]
    out = torch.zeros(*lead, h + 2, w + 2, dtype=box.dtype, device=box.device)
    for k in range(3):
        out[..., k:k + h, :] += py[..., k, :]
    return out


def _sum_canvases(parts: list[LevelCanvas], batch: int) -> LevelCanvas | None:
    if len(parts) <= 1:
        return parts[0] if parts else None
    top = min(c.y0 for c in parts)
    left = min(c.x0 for c in parts)
    bottom = max(c.y0 + c.planes.shape[2] for c in parts)
    right = max(c.x0 + c.planes.shape[3] for c in parts)
    total = torch.zeros(batch, 2, bottom - top, right - left, dtype=parts[0].planes.dtype,
                        device=parts[0].planes.device)
    for c in parts:
        h, w = c.planes.shape[2], c.planes.shape[3]
        total[:, :, c.y0 - top:c.y0 - top + h, c.x0 - left:c.x0 - left + w] += c.planes
    return LevelCanvas(total, top, left)


def _upsample(x: torch.Tensor, src: _Grid, dst: _Grid) -> torch.Tensor:
    """Bilinear interpolation (align_corners=False) of real [B,C,src.h,src.w] on lattice src to lattice
    dst (finer by a power of two, both from the same origin or dst = the image at (0, 0))."""
    f = src.scale // dst.scale
    # cells of src that the dst window needs, with one cell of context on each side
    oy, ox = (dst.y0 - src.y0) // src.scale - 1, (dst.x0 - src.x0) // src.scale - 1
    ny, nx = -(-dst.h // f) + 3, -(-dst.w // f) + 3
    ya, xa = max(oy, 0), max(ox, 0)
    window = x[:, :, ya:oy + ny, xa:ox + nx]
    window = F.pad(window, (xa - ox, ox + nx - xa - window.shape[-1], ya - oy, oy + ny - ya - window.shape[-2]),
                   mode="replicate")
    up = F.interpolate(window, scale_factor=f, mode="bilinear", align_corners=False)
    sy = dst.y0 - src.y0 - (oy * src.scale)
    sx = dst.x0 - src.x0 - (ox * src.scale)
    return up[:, :, sy // dst.scale: sy // dst.scale + dst.h, sx // dst.scale: sx // dst.scale + dst.w]


def _over(acc: torch.Tensor, pending, level) -> None:
    """acc = acc * (1 - coverage of level) + pending, in place (complex planes on one lattice)."""
    a = _channels(acc)
    if level is not None:
        keep = _pairs(_transmittance(level))
        if pending is not None:
            torch.addcmul(_channels(pending), a, keep, out=a)
        else:
            a.mul_(keep)
    elif pending is not None:
        a.add_(_channels(pending))


def _move(tensors, src: _Grid, dst: _Grid):
    """Complex planes (or None) and real maps [B,h,w] on lattice src -> the same on lattice dst (a tensor
    given twice is moved once and comes back twice)."""
    unique = list({id(t): t for t in tensors if t is not None}.values())
    if not unique:
        return list(tensors)
    up = _upsample(torch.cat([_planar(t) if t.is_complex() else t[:, None] for t in unique], dim=1), src, dst)
    moved, c = {}, 0
    for t in unique:
        if t.is_complex():
            moved[id(t)] = _from_planar(up[:, c:c + 4])
            c += 4
        else:
            moved[id(t)] = up[:, c].contiguous()
            c += 1
    return [None if t is None else moved[id(t)] for t in tensors]


def _schedule(levels: list[Level]) -> list[tuple[str, object]]:
    """The order in which `_composite` uses the levels: ("coarse", run) for the coarse levels behind the
    full-resolution ones (one run per lattice, from the coarsest on), ("fine", idx) for the
    full-resolution levels back to front, then ("coarse", run) for those in front (from the coarsest
    lattice back). Runs are lists of consecutive level indices on one lattice."""
    n = len(levels) - 1
    jobs, idx = [], -n
    while idx < 0 and levels[-idx].scale > 1:
        run = [i for i in range(idx, 0) if levels[-i].scale == levels[-idx].scale]
        jobs.append(("coarse", run))
        idx += len(run)
    while idx <= n and levels[abs(idx)].scale == 1:
        jobs.append(("fine", idx))
        idx += 1
    j = n
    while j >= idx:
        run = [i for i in range(j, idx - 1, -1) if levels[i].scale == levels[j].scale]
        jobs.append(("coarse", run))
        j -= len(run)
    return jobs


def _rendered(engine: _LevelRenderer, jobs, workers: int):
    """The jobs' renders (`render` or `render_coarse_run`), in order. With workers > 1 they are rendered
    on that many threads, at most `workers` jobs ahead of the compositing (bounded memory): levels are
    independent, so this parallelism needs no synchronisation inside an operation."""
    def run(job):
        kind, arg = job
        return engine.render(arg) if kind == "fine" else engine.render_coarse_run(arg)

    if workers <= 1:
        for job in jobs:
            yield run(job)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="bokeh-levels") as pool:
        todo = iter(jobs)
        ahead = deque(pool.submit(run, job) for job in itertools.islice(todo, workers))
        while ahead:
            done = ahead.popleft().result()
            job = next(todo, None)
            if job is not None:
                ahead.append(pool.submit(run, job))
            yield done


def _composite(engine: _LevelRenderer, B: int, H: int, W: int, workers: int = 1) -> torch.Tensor:
    """Composite levels -n..n back to front: level j's light is dimmed by the coverage of every level
    from j + 2 on (its direct neighbours are the same surface split in two and do not hide it).

    Coarse levels are composited on their own lattices: those behind the full-resolution ones
    back to front ("over"), those in front of them front to back ("under", keeping the
    transmittance); each group crosses to full resolution once. -> RGBA as complex planes [B,2,H,W].
    The levels are rendered ahead on `workers` threads (`_rendered`).
    """
    levels = engine.levels
    image = _Grid(1, 0, 0, H, W)
    jobs = _schedule(levels)
    rendered = _rendered(engine, jobs, workers)
    behind = [arg for kind, arg in jobs if kind == "coarse" and arg[0] < 0]
    fine = [arg for kind, arg in jobs if kind == "fine"]
    front = [arg for kind, arg in jobs if kind == "coarse" and arg[0] > 0]
    # behind: coarse levels, over-composited from the coarsest lattice to the finest
    # (None = nothing there yet: empty lattices are neither composited nor moved)
    acc = pending = grid = None
    for run in behind:
        g = engine.grids[levels[-run[0]].scale]
        if grid is not None:
            acc, pending = _move([acc, pending], grid, g)
        grid = g
        for level in next(rendered):
            if acc is None:
                acc = pending  # acc = 0 * (1 - coverage) + pending
            else:
                _over(acc, pending, level)
            pending = level
    if grid is not None:
        acc, pending = _move([acc, pending], grid, image)
    if acc is None:
        acc = torch.zeros(B, 2, H, W, dtype=torch.complex64, device=engine.device)
    pending = None if pending is None else LevelCanvas(pending, 0, 0)
    # the middle: full-resolution levels
    for _ in fine:
        canvas = next(rendered)
        cl = None if canvas is None else canvas.clip(H, W)
        pcl = None if pending is None else pending.clip(H, W)
        if cl is not None:
            (iy, ix), (cy, cx) = cl
            keep = _pairs(_transmittance(canvas.planes[:, :, cy, cx]))
            region = _channels(acc)[:, :, iy, ix]
            if pcl is not None and pcl[0] == cl[0]:  # dim and add the previous level in one pass
                py, px = pcl[1]
                torch.addcmul(_channels(pending.planes)[:, :, py, px], region, keep, out=region)
                pcl = None
            else:
                region.mul_(keep)
        if pcl is not None:
            (qy, qx), (py, px) = pcl
            acc[:, :, qy, qx] += pending.planes[:, :, py, px]
        pending = canvas
    pcl = None if pending is None else pending.clip(H, W)
    if pcl is not None:  # the last full-resolution level (weighted by the front levels' p2 below)
        acc[:, :, pcl[0][0], pcl[0][1]] += pending.planes[:, :, pcl[1][0], pcl[1][1]]
    if not front:
        return acc
    # in front: coarse levels, under-composited from the nearest (coarsest lattice) back.
    # light = sum of level j's light times p_{j+2}, p_m = prod over levels k >= m of (1 - coverage_k)
    # (None until the nearest level with pixels: light = 0, p1 = p2 = 1 in front of it)
    light = p1 = p2 = grid = None  # p1 = p_{j+1}, p2 = p_{j+2} for the next level j
    for run in front:
        g = engine.grids[levels[run[0]].scale]
        if grid is not None:
            light, p1, p2 = _move([light, p1, p2], grid, g)
        grid = g
        for level in next(rendered):
            if level is None:
                p2 = p1
                continue
            if light is None:
                light = torch.zeros(B, 2, g.h, g.w, dtype=torch.complex64, device=engine.device)
                p1 = p2 = torch.ones(B, g.h, g.w, device=engine.device)
            _channels(light).addcmul_(_channels(level), _pairs(p2))
            p1, p2 = p1 * _transmittance(level), p1
    if light is None:
        return acc
    # only the window the front levels reach crosses to full resolution: outside it there is no light
    # in front (p1 = p2 = 1, light = 0)
    window = _window([engine.supports.get(i, (0, 0, 0, 0)) for run in front for i in run], H, W)
    if window is None:
        return acc
    y0, y1, x0, x1 = window
    light, p1, p2 = _move([light, p1, p2], grid, _Grid(1, y0, x0, y1 - y0, x1 - x0))
    # everything at full resolution so far lies behind: acc (levels < idx - 1) is dimmed by p1 and
    # pending (level idx - 1) by p2; pending is in acc already, so it gets p2 - p1 on top
    region = acc[:, :, y0:y1, x0:x1]
    _channels(region).mul_(_pairs(p1))
    if pcl is not None:
        (qy, qx), _ = pcl
        oy0, oy1, ox0, ox1 = max(qy.start, y0), min(qy.stop, y1), max(qx.start, x0), min(qx.stop, x1)
        if oy0 < oy1 and ox0 < ox1:
            inside = pending.planes[:, :, oy0 - pending.y0:oy1 - pending.y0, ox0 - pending.x0:ox1 - pending.x0]
            wy, wx = slice(oy0 - y0, oy1 - y0), slice(ox0 - x0, ox1 - x0)
            _channels(acc[:, :, oy0:oy1, ox0:ox1]).addcmul_(_channels(inside), _pairs(p2[:, wy, wx] - p1[:, wy, wx]))
    region += light
    return acc


def _window(supports, H: int, W: int):
    """The union of supports (y0, y1, x0, x1; None = anywhere) within an H x W image, or None if empty."""
    boxes = [(0, H, 0, W) if b is None else b for b in supports]
    boxes = [b for b in boxes if b[0] < b[1] and b[2] < b[3]]
    if not boxes:
        return None
    y0, y1 = max(min(b[0] for b in boxes), 0), min(max(b[1] for b in boxes), H)
    x0, x1 = max(min(b[2] for b in boxes), 0), min(max(b[3] for b in boxes), W)
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


# ------------------------------------------------------------------------------------------------
# public API


def _clean_map(m: torch.Tensor, name: str) -> torch.Tensor:
    bad = ~torch.isfinite(m)
    if bad.any():
        m = fill_with_median(m, bad, f"{name} has no finite values; check the depth input.")
        log.warning("%s had %d NaN/infinite pixels; filled with the median of the rest.", name, int(bad.sum()))
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
        r = to_map_batch(defocus_px, "defocus map", batch=batch, size=image_hw).to(device)
        if not torch.isfinite(r).all():
            raise InputError("Defocus map contains NaN or infinite values.")
        return _fit_map(r, image_hw, "Defocus map")
    K = check_blur_level(K)
    if disparity is None:
        if K == 0.0:
            return torch.zeros(batch, *image_hw, device=device)
        raise InputError("Give a disparity (or depth converted to disparity) map or a defocus map for blur.")
    disp = to_map_batch(disparity, "disparity", batch=batch, size=image_hw).to(device)
    disp = _fit_map(_clean_map(disp, "Disparity map"), image_hw, "Disparity map")
    if focus_disparity is None:
        focus = resolve_focus(disp)
    else:
        focus = torch.as_tensor(focus_disparity, dtype=torch.float32, device=disp.device).flatten()
        if not torch.isfinite(focus).all():
            raise InputError(f"Focus disparity must be finite, got {focus_disparity}.")
        if focus.numel() not in (1, batch):
            raise InputError(f"Focus disparity: expected 1 or {batch} values, got {focus.numel()}.")
        focus = focus.expand(batch)
    return signed_coc(disp, focus, K)


# The highlight boost of the node and the CLI (render_bokeh itself defaults to 0, the plain blur): a
# clipped point light's bokeh disc half as bright as the light (1 = as bright).
HIGHLIGHT_BOOST_DEFAULT = 0.5
HIGHLIGHT_THRESHOLD_DEFAULT = 0.9


def highlight_gain(lin: torch.Tensor, radius: torch.Tensor, boost: float, threshold: float) -> torch.Tensor:
    """Gain [B,H,W,1] of the linear light of each pixel before blurring, for highlight_boost.

    A clipped highlight held more light than its pixel shows; blurred, that light spreads over the
    bokeh disc and comes out dim. The gain acts only on pixels whose brightest linear channel is above
    `threshold` (weight t rising smoothly from 0 there to 1 at white) and fills the disc back towards
    the highlight's own brightness: with density n = the mean of t over a square of the disc's area
    pi r^2 around the pixel, gain = 1 + boost * t * (min(1 / n, pi r^2) - 1). An isolated point light at boost 1 gets
    gain ~ pi r^2, so its disc is as bright as the light was; a large bright area (n = 1) and in-focus
    pixels (area <= 1) get none. Energy is kept: the renderer spreads each pixel's boosted light
    without loss, and below boost 1 no disc of an isolated highlight exceeds its source (nothing clips).
    """
    B, H, W, _ = lin.shape
    t = ((lin.amax(dim=-1) - threshold) / (1.0 - threshold)).clamp(0, 1)
    t = t * t * (3 - 2 * t)
    gain = torch.ones(B, H, W, dtype=lin.dtype, device=lin.device)
    bi, yi, xi = (t > 0).nonzero(as_tuple=True)  # the work is only at the highlights
    if bi.numel() == 0:
        return gain[..., None]
    sat = F.pad(t.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0)).view(B, -1)  # [B,(H+1)(W+1)]
    r = radius[bi, yi, xi].abs().to(torch.float64)
    h = (r * (math.sqrt(math.pi) / 2)).round().long()  # box of side 2h + 1 with about the disc's area
    y0, y1 = (yi - h).clamp(0, H), (yi + h + 1).clamp(0, H)
    x0, x1 = (xi - h).clamp(0, W), (xi + h + 1).clamp(0, W)

    def corner(y, x):
        return sat[bi, y * (W + 1) + x]

    total = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)
    area = ((y1 - y0) * (x1 - x0)).to(torch.float64)
    disc = (math.pi * r * r).clamp_min(1.0)  # the box only approximates it
    spread = torch.minimum(area / total.clamp_min(1e-12), disc)  # 1 / density, at most the disc's area
    boosted = 1.0 + float(boost) * t[bi, yi, xi].to(torch.float64) * (spread - 1.0).clamp_min(0.0)
    gain[bi, yi, xi] = boosted.to(gain.dtype)
    return gain[..., None]


@contextmanager
def _intra_op_threads(n: int):
    """torch's intra-op thread count set to n for the block (process-wide), then restored."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The machine counts as busy when its 1-minute load average exceeds its CPUs by this much (the render's
# own threads are part of the load).
BUSY_LOAD_MARGIN = 0.5


def _machine_busy() -> bool:
    """More runnable threads than CPUs (Unix load average; False where it is unknown)."""
    try:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return os.getloadavg()[0] > cpus + BUSY_LOAD_MARGIN
    except (OSError, AttributeError):
        return False


def _parallelism(threads, device) -> tuple[int, int]:
    """(level worker threads, torch intra-op threads) for a render on `threads` CPU threads (None =
    torch's count). On a quiet machine torch splits every operation across the threads. On a busy one
    (`_machine_busy`) an operation split in two waits at its end for the slower half, which waits for the
    scheduler: hundreds of operations a render made it ~10x slower under a competing 2-thread job. There
    the levels are rendered on `threads` worker threads instead (they are independent), each operation on
    one thread, so a thread that loses its CPU delays only its own level. GPUs: unchanged."""
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be an integer >= 1 (or None = torch's thread count), got {threads!r}.")
    if torch.device(device).type != "cpu":
        return 1, torch.get_num_threads()
    if threads > 1 and _machine_busy():
        return threads, 1
    return 1, threads


VIGNETTING_GRID = 5
# Frames of a batch are rendered this many pixels at a time (a 1920 x 1080 frame alone).
FRAME_PIXELS_PER_CALL = 2 ** 21


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


def _render_frames(img, lin, radius, levels, aperture, colorspace, highlight_boost, highlight_threshold, flip_front,
                   regions, workers) -> torch.Tensor:
    """The render of frames img [B,H,W,3] (lin: the same in linear light) at signed radii [B,H,W] on the
    given level ladder (no grain)."""
    B, H, W, _ = img.shape
    lo, w_lo, w_hi = level_weights(radius, levels)
    sign = (radius >= 0).to(torch.int8).mul_(2).sub_(1)  # -1 behind the focal plane, +1 in front

    if highlight_boost > 0:
        lin = lin * highlight_gain(lin, radius, highlight_boost, highlight_threshold)

    engine = _LevelRenderer(lin, lo, w_lo, w_hi, sign, levels, aperture, flip_front, regions)
    del lin, lo, w_lo, w_hi, sign
    acc = _composite(engine, B, H, W, workers)
    channels = torch.view_as_real(acc)  # [B,2,H,W,2]: (R, G), (B, A)
    out = torch.empty(B, H, W, 3, dtype=torch.float32, device=acc.device)
    for _, rows in _row_bands(out):
        part, light = out[:, rows], channels[:, :, rows]
        alpha = light[:, 1, ..., 1].mul(1.0 / ALPHA_SCALE).clamp_min_(1e-6)
        torch.div(light[:, 0], alpha[..., None], out=part[..., 0:2])
        torch.div(light[:, 1, ..., 0], alpha, out=part[..., 2])
        if colorspace == "srgb":
            _linear_to_srgb_(part, part)
        else:
            part.clamp_(0.0, 1.0)
    # in-focus pixels that no other level's light reaches come back exactly (not up to FFT rounding)
    focus = ((radius < IN_FOCUS_RADIUS) & (radius > -IN_FOCUS_RADIUS)).flatten().nonzero().flatten()
    if focus.numel():
        flat_out, flat_in = out.view(-1, 3), img.reshape(-1, 3)
        mine, given = flat_out.index_select(0, focus), flat_in.index_select(0, focus)
        same = (mine - given).abs().amax(dim=-1, keepdim=True) <= EXACT_TOLERANCE
        flat_out.index_copy_(0, focus, torch.where(same, given, mine))
    return out


def render_bokeh(image, disparity=None, focus_disparity=None, K: float = 0.0, aperture: Aperture | None = None,
                 *, defocus_px=None, colorspace: str = "srgb", highlight_boost: float = 0.0,
                 highlight_threshold: float = HIGHLIGHT_THRESHOLD_DEFAULT, max_radius: float | None = None,
                 quality: str = "balanced", flip_front: bool = True, vignetting: float = 0.0, grain: float = 0.0,
                 grain_seed: int = 0, threads: int | None = None) -> torch.Tensor:
    """Refocus `image` [B,H,W,3] (anything `to_image_batch` takes) -> [B,H,W,3] in [0,1].

    Blur: either disparity [B,H,W] (1/m, bigger = nearer) + focus_disparity (scalar or [B]; None = the
    centre pixel) + K (px of CoC radius per unit of disparity), or defocus_px: a signed CoC radius map
    in px (> 0 in front of the focal plane, < 0 behind; an unsigned map is read as all in front).
    A disparity/defocus map of another size is resized to the image with a logged warning; NaN/inf
    disparity pixels are filled with the median (warning). K = 0 returns the image unchanged.
    aperture: an `apertures.Aperture` (None = circle). The shape is used as given behind the focal
    plane and turned by 180 degrees in front of it (as in a real lens) unless flip_front=False.
    colorspace: "srgb" (photos: blur in linear light) or "linear" (data already linear).
    highlight_boost: clipped highlights (brightest linear channel above highlight_threshold) get back the
    light their pixels could not hold, so they bloom like the point lights they were: 0 = off, 1 = an
    isolated highlight's bokeh disc as bright as the highlight (energy kept, nothing clips), above 1
    brighter still (discs clip). Only pixels above the threshold and blurred are changed
    (`highlight_gain`).
    max_radius: cap on |r| in px (default: half the long edge); larger radii are capped with a warning.
    vignetting: 0..1, cat's-eye bokeh towards the frame's edges: the aperture is clipped by an offset
    circle whose offset grows linearly from 0 at the centre to `vignetting` at the corners, pointing to
    the centre (rendered per region of a VIGNETTING_GRID x VIGNETTING_GRID grid).
    grain: 0 = off; > 0 adds the noise measured in the image's sharp region where it was blurred (1 =
    matched), seeded by grain_seed, so blurred areas do not look plastic (`grain.add_matched_grain`).
    quality: "fast" | "balanced" | "best": depth-level spacing and when coarse grids take over
    (QUALITY_PRESETS); the CoC radius is equally exact in all three, the bokeh edges get crisper
    (edge ramp about 25% / 12% / 6% of the radius at large radii) and the render slower.
    threads (CPU): None = torch.get_num_threads(). On a quiet machine torch uses them inside every
    operation; on a busy one the depth levels are rendered on that many worker threads, one thread per
    operation (`_parallelism`; torch's thread count is restored afterwards). Same picture either way.
    """
    img = to_image_batch(image)
    B, H, W, _ = img.shape
    device = img.device
    if device.type == "cpu":
        check_fits_in_memory(B * H * W * RENDER_BYTES_PER_PIXEL, f"Rendering {B} image(s) of {W}x{H} px")
    if colorspace not in ("srgb", "linear"):
        raise InputError(f"colorspace must be 'srgb' or 'linear', got {colorspace!r}.")
    if not (math.isfinite(float(highlight_boost)) and float(highlight_boost) >= 0):
        raise InputError(f"highlight_boost must be a number >= 0, got {highlight_boost}.")
    if not 0.0 <= float(highlight_threshold) < 1.0:
        raise InputError(f"highlight_threshold must be in [0, 1), got {highlight_threshold}.")
    if not (math.isfinite(float(grain)) and float(grain) >= 0):
        raise InputError(f"grain must be a finite number >= 0 (0 = off, 1 = matched), got {grain}.")
    aperture = aperture if aperture is not None else circle()
    if not isinstance(aperture, Aperture):
        raise InputError(f"aperture must be an Aperture (see genrefocus_core.basics.apertures), got {type(aperture).__name__}.")

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
    workers, intra_op = _parallelism(threads, device)
    levels = build_levels(peak, aperture, *QUALITY_PRESETS[quality])
    regions = _vignetting_regions(aperture, vignetting, H, W)
    # a batch goes FRAME_PIXELS_PER_CALL at a time (all on the batch's level ladder): peak memory is
    # that of one frame, and a clip's frames reuse the kernel spectra of the same lattices
    step = max(1, FRAME_PIXELS_PER_CALL // (H * W))
    with _intra_op_threads(intra_op):
        out = torch.empty_like(img)
        linear = None  # (frames, the same in linear light): a still repeated over a focus pull converts once
        for b in range(0, B, step):
            frames = img[b:b + step]
            if linear is None or linear[0].shape != frames.shape or not torch.equal(linear[0], frames):
                linear = (frames, srgb_to_linear(frames) if colorspace == "srgb" else frames)
            out[b:b + step] = _render_frames(frames, linear[1], radius[b:b + step], levels, aperture, colorspace,
                                             highlight_boost, highlight_threshold, flip_front, regions, workers)
        return add_matched_grain(out, img, radius, grain, grain_seed) if grain else out
