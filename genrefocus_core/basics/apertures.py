"""Aperture shapes for bokeh: circle, bladed polygons, triangle, star, heart, cat-eye, user masks.

Most shapes are star-shaped around their centre and described by their radial function rho(theta):
the distance from the centre to the outline along direction theta, scaled so that the largest distance
(the circumradius) is 1. Angles are in image coordinates (x to the right, y down), so a positive
rotation turns the shape clockwise on screen. "Radius r" always means circumradius r pixels.

Every shape has an edge coordinate e(x, r): a signed distance in pixels from the outline of the shape
at circumradius r, <= 0 inside. For star-shaped ones it is g(x) - r with the gauge g(x) = |x| /
rho(angle of x), the circumradius at which the outline passes through x; shapes with holes (annular,
mirror lens) and user masks (kept exactly as drawn) have their own. It gives two rasterisations:
- `kernel(r)`: supersampled coverage of {e <= 0}, normalised to sum 1 (what users see and export);
- `ramp_kernel(r, width)`: clamp(0.5 - e / width, 0, 1), normalised. Its half-maximum contour is
  exactly the outline at r, and mixing two such kernels at radii r1 < r2 (width >= r2 - r1) moves
  that contour continuously, which is how the renderer gets sub-pixel CoC accuracy from a few layers.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, finite_number

RadialFn = Callable[[torch.Tensor], torch.Tensor]
EdgeFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

# Ramp kernels put half maximum this far (px) outside the outline: ties on the outline count as inside.
OUTLINE_EPS = 2e-3
# Radial functions given as tables are sampled at this many angles (linear interpolation between).
_TABLE_SIZE = 4096


class Aperture:
    """An aperture outline with circumradius 1 around its centre.

    name: short label; params: the parameters it was built from (for display and serialisation);
    radial: rho(theta) -> (0, 1] for angles in radians (image coordinates, y down), for star-shaped
    shapes; edge: e(dx, dy, radius) -> signed distance in px from the outline (<= 0 inside), for the
    others (then radial is None).
    """

    def __init__(self, name: str, radial: RadialFn | None, params: dict | None = None, mask: np.ndarray | None = None,
                 edge: EdgeFn | None = None):
        if (radial is None) == (edge is None):
            raise ValueError("An aperture is given by exactly one of radial and edge.")
        self.name = name
        self.params = dict(params or {})
        self._radial = radial
        self._edge = edge
        self._mask = mask  # the user's original mask, if any
        self._ramp_cache: dict = {}  # ramp_kernel results: renders ask for the same levels again and again

    def __repr__(self) -> str:
        return f"Aperture({self.name!r}, {self.params})"

    # -- geometry -------------------------------------------------------------------------------
    @property
    def star_shaped(self) -> bool:
        """True when the outline is a radial function around the centre (no holes, no hidden notches)."""
        return self._radial is not None

    def radial(self, theta: torch.Tensor) -> torch.Tensor:
        """rho(theta): outline distance at circumradius 1, same shape as theta (star-shaped only)."""
        if self._radial is None:
            raise InputError(f"The {self.name} aperture is not star-shaped: it has no radial function.")
        return self._radial(theta)

    def gauge(self, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """Circumradius (px) at which the outline passes through offset (dx, dy) from the centre."""
        dist = torch.sqrt(dx * dx + dy * dy)
        rho = self.radial(torch.atan2(dy, dx)).clamp_min(1e-6)
        return dist / rho

    def edge(self, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
        """Signed distance-like coordinate (px) of offsets (dx, dy) from the outline at circumradius
        `radius`: 0 on it, < 0 inside, growing by about 1 per pixel across it."""
        if self._edge is not None:
            return self._edge(dx, dy, float(radius))
        return self.gauge(dx, dy) - float(radius)

    def inside(self, dx, dy, radius: float) -> torch.Tensor:
        """Boolean: offsets (dx, dy) inside the shape scaled to circumradius `radius`."""
        dx = torch.as_tensor(dx, dtype=torch.float64)
        dy = torch.as_tensor(dy, dtype=torch.float64)
        return self.edge(dx, dy, radius) <= 0

    def area_unit(self, samples: int = 8192) -> float:
        """Area of the shape at circumradius 1 (pi for a circle)."""
        if self._radial is None:  # count pixel centres at a large radius
            big = 256.0
            xx, yy = self._grid(int(big) + 1, 1, None, torch.float64)
            return float((self.edge(xx, yy, big) <= 0).sum()) / (big * big)
        theta = torch.linspace(-math.pi, math.pi, samples + 1, dtype=torch.float64)[:-1]
        rho = self._radial(theta)
        return float(0.5 * (rho * rho).mean() * 2 * math.pi)

    # -- rasterisation --------------------------------------------------------------------------
    @staticmethod
    def _grid(half: int, supersample: int = 1, device=None, dtype=torch.float32):
        n = 2 * half + 1
        step = 1.0 / supersample
        offs = (torch.arange(n * supersample, device=device, dtype=dtype) + 0.5) * step - 0.5 - half
        yy, xx = torch.meshgrid(offs, offs, indexing="ij")
        return xx, yy

    def kernel(self, radius: float, supersample: int = 8, device=None, dtype=torch.float32) -> torch.Tensor:
        """Anti-aliased kernel [n, n] (n = 2*ceil(radius)+1) of the shape at circumradius `radius`,
        pixel coverage from supersample^2 samples per pixel, normalised to sum 1. A radius below 0.5
        gives the 1x1 identity kernel."""
        radius = float(radius)
        if not math.isfinite(radius) or radius < 0:
            raise InputError(f"Aperture radius must be a finite number >= 0, got {radius}.")
        if radius < 0.5:
            return torch.ones(1, 1, device=device, dtype=dtype)
        half = int(math.ceil(radius))
        xx, yy = self._grid(half, supersample, device, torch.float64)
        cov = (self.edge(xx, yy, radius) <= 0).to(torch.float64)
        n = 2 * half + 1
        cov = cov.reshape(n, supersample, n, supersample).mean(dim=(1, 3))
        if cov.sum() <= 0:  # a degenerate sliver at tiny radius: fall back to the centre pixel
            cov[half, half] = 1.0
        return (cov / cov.sum()).to(dtype)

    def ramp_kernel(self, radius: float, width: float, device=None, dtype=torch.float32,
                    normalize: bool = True) -> torch.Tensor:
        """Kernel [n, n] with a linear edge ramp `width` px wide (in circumradius units) centred on the
        outline at `radius`; sampled at pixel centres, normalised to sum 1 (else centre value 1).
        The ramp is centred OUTLINE_EPS px outside the outline so that pixel centres lying exactly on
        it count as inside (>= half maximum), like `inside`. The result is cached: do not modify it."""
        radius, width = float(radius), float(width)
        key = (radius, width, str(device), dtype, normalize)
        cached = self._ramp_cache.get(key)
        if cached is not None:
            return cached
        half = int(math.ceil(radius + 0.5 * width + OUTLINE_EPS))
        xx, yy = self._grid(half, 1, device, torch.float64)
        k = (0.5 - (self.edge(xx, yy, radius) - OUTLINE_EPS) / width).clamp(0.0, 1.0)
        if k.sum() <= 0:
            k[half, half] = 1.0
        k = (k / k.sum() if normalize else k).to(dtype)
        if len(self._ramp_cache) >= 512:
            self._ramp_cache.clear()
        self._ramp_cache[key] = k
        return k

    def condition_image(self, height: int, width: int, fill: float = 0.8) -> torch.Tensor:
        """White shape on black, [1, H, W, 3] float32: the aperture exemplar the generative BokehNet's
        shape tokens are made from. The shape is centred with circumradius fill * min(H, W) / 2."""
        if int(height) < 1 or int(width) < 1:
            raise InputError(f"Condition image size must be positive, got {height}x{width}.")
        height, width = int(height), int(width)
        radius = max(0.5, fill * min(height, width) / 2.0)
        ss = 4
        ys = (torch.arange(height * ss, dtype=torch.float64) + 0.5) / ss - height / 2.0
        xs = (torch.arange(width * ss, dtype=torch.float64) + 0.5) / ss - width / 2.0
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        cov = (self.edge(xx, yy, radius) <= 0).to(torch.float32)
        cov = cov.reshape(height, ss, width, ss).mean(dim=(1, 3))
        return cov[None, :, :, None].expand(1, height, width, 3).contiguous()


# ------------------------------------------------------------------------------------------------
# radial-function helpers


def _rotated(fn: RadialFn, rotation_deg: float) -> RadialFn:
    rot = math.radians(finite_number(rotation_deg, "Aperture rotation (degrees)"))
    if rot == 0.0:
        return fn
    return lambda theta: fn(theta - rot)


def _table_radial(table: torch.Tensor) -> RadialFn:
    """rho from N samples at angles -pi + 2*pi*i/N, linearly interpolated (periodic)."""
    table = table.to(torch.float64)
    n = table.numel()

    def fn(theta: torch.Tensor) -> torch.Tensor:
        pos = torch.remainder(theta.to(torch.float64) + math.pi, 2 * math.pi) * (n / (2 * math.pi))
        i0 = pos.floor().long() % n
        frac = pos - pos.floor()
        out = table[i0] * (1 - frac) + table[(i0 + 1) % n] * frac
        return out.to(theta.dtype) if theta.is_floating_point() else out

    return fn


def _polygon_outline_table(xy: np.ndarray, size: int = _TABLE_SIZE) -> torch.Tensor:
    """Radial table (largest ray hit per angle) of a closed polygon outline xy [N,2] around (0,0)."""
    a = torch.as_tensor(xy, dtype=torch.float64)
    b = torch.roll(a, -1, 0)
    theta = -math.pi + 2 * math.pi * torch.arange(size, dtype=torch.float64) / size
    d = torch.stack([torch.cos(theta), torch.sin(theta)], 1)  # [T,2]
    e = b - a  # [S,2]
    # Solve t*d = a + u*e for t >= 0, u in [0,1] (2x2 system per ray/segment pair).
    denom = d[:, None, 0] * (-e[None, :, 1]) - d[:, None, 1] * (-e[None, :, 0])  # det [d, -e]
    t = (a[None, :, 0] * (-e[None, :, 1]) - a[None, :, 1] * (-e[None, :, 0])) / denom
    u = (d[:, None, 0] * a[None, :, 1] - d[:, None, 1] * a[None, :, 0]) / denom
    ok = (denom.abs() > 1e-12) & (u >= -1e-9) & (u <= 1 + 1e-9) & (t > 0)
    t = torch.where(ok, t, torch.zeros_like(t))
    return t.max(dim=1).values


def _normalise_table(table: torch.Tensor, what: str) -> torch.Tensor:
    top = float(table.max())
    if not top > 0:
        raise InputError(f"{what}: the shape has no area.")
    return (table / top).clamp_min(1e-4)


def _polygon_area_centroid(xy: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2.0
    cx = ((x + x1) * cross).sum() / (6.0 * area)
    cy = ((y + y1) * cross).sum() / (6.0 * area)
    return float(area), np.array([cx, cy])


# ------------------------------------------------------------------------------------------------
# shapes


def circle() -> Aperture:
    """Round aperture (a lens wide open)."""
    return Aperture("circle", lambda theta: torch.ones_like(theta), {"shape": "circle"})


def polygon(blades: int = 6, rotation_deg: float = 0.0, curvature: float = 0.0) -> Aperture:
    """Regular n-blade aperture. rotation_deg = 0 puts a vertex straight up; positive turns it
    clockwise. curvature in [0, 1] bows the blade edges outwards (0 = straight, 1 = circle)."""
    blades = int(blades)
    if blades < 3:
        raise InputError(f"A polygon aperture needs at least 3 blades, got {blades}.")
    curvature = float(curvature)
    if not 0.0 <= curvature <= 1.0:
        raise InputError(f"Blade curvature must be in [0, 1], got {curvature}.")
    sector = 2 * math.pi / blades
    apothem = math.cos(math.pi / blades)
    vertex = -math.pi / 2 + math.radians(finite_number(rotation_deg, "Aperture rotation (degrees)"))

    def fn(theta: torch.Tensor) -> torch.Tensor:
        phi = torch.remainder(theta - vertex, sector)
        rho = apothem / torch.cos(phi - math.pi / blades)
        return rho + curvature * (1.0 - rho)

    name = "triangle" if blades == 3 else f"{blades}-gon"
    return Aperture(name, fn, {"shape": "polygon", "blades": blades, "rotation_deg": float(rotation_deg),
                               "curvature": curvature})


def triangle(rotation_deg: float = 0.0) -> Aperture:
    """Three-blade aperture, a vertex up by default."""
    return polygon(3, rotation_deg)


def star(points: int = 5, inner_ratio: float = 0.5, rotation_deg: float = 0.0) -> Aperture:
    """Star with `points` tips (a tip straight up by default); inner_ratio = inner / outer radius."""
    points = int(points)
    if points < 3:
        raise InputError(f"A star aperture needs at least 3 points, got {points}.")
    if not 0.05 <= float(inner_ratio) < 1.0:
        raise InputError(f"Star inner_ratio must be in [0.05, 1), got {inner_ratio}.")
    half = math.pi / points
    ri = float(inner_ratio)
    vertex = -math.pi / 2 + math.radians(finite_number(rotation_deg, "Aperture rotation (degrees)"))

    def fn(theta: torch.Tensor) -> torch.Tensor:
        phi = torch.remainder(theta - vertex, 2 * half)
        phi = torch.where(phi > half, 2 * half - phi, phi)  # mirror: 0 at a tip, `half` at a notch
        # ray/segment intersection between the tip (angle 0, radius 1) and notch (angle half, ri)
        return ri * math.sin(half) / (torch.sin(phi) + ri * torch.sin(half - phi))

    return Aperture("star", fn, {"shape": "star", "points": points, "inner_ratio": ri,
                                 "rotation_deg": float(rotation_deg)})


@functools.lru_cache(maxsize=1)
def _heart_table() -> torch.Tensor:
    t = np.linspace(0, 2 * np.pi, 1200, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y down
    xy = np.stack([x, y], 1)
    _, c = _polygon_area_centroid(xy)
    return _normalise_table(_polygon_outline_table(xy - c), "heart")


def heart(rotation_deg: float = 0.0) -> Aperture:
    """Heart (the classic parametric curve), point down, centred on its area centroid."""
    table = _heart_table()
    return Aperture("heart", _rotated(_table_radial(table), rotation_deg),
                    {"shape": "heart", "rotation_deg": float(rotation_deg)})


def vignetted(aperture: "Aperture", strength: float, direction_deg: float = 0.0) -> "Aperture":
    """Mechanical vignetting ("cat's eye") seen off-axis: `aperture` clipped by a circle of its
    circumradius whose centre is offset by `strength` (0 = none, < 1) circumradii towards
    `direction_deg` (the direction to the image centre; 0 = right, 90 = down, image coordinates).
    The shape keeps the unclipped pupil's centre, so radius r still means the pupil's circumradius."""
    s = float(strength)
    if not 0.0 <= s < 1.0:
        raise InputError(f"Cat-eye strength must be in [0, 1), got {strength}.")
    if s == 0.0:
        return aperture
    ang = math.radians(finite_number(direction_deg, "Cat-eye direction (degrees)"))
    ox, oy = s * math.cos(ang), s * math.sin(ang)
    name = "cat-eye" if aperture.name == "circle" else f"{aperture.name} (vignetted)"
    params = {**aperture.params, "cat_eye_strength": s, "direction_deg": float(direction_deg)}
    if not aperture.star_shaped:  # intersection with the offset circle, on the edge coordinates
        def edge(dx, dy, r):
            return torch.maximum(aperture.edge(dx, dy, r), torch.hypot(dx - ox * r, dy - oy * r) - r)

        return Aperture(name, None, params, edge=edge)
    base = aperture.radial

    def fn(theta: torch.Tensor) -> torch.Tensor:
        # distance along the ray to the offset unit circle: t^2 - 2 t (d.o) + |o|^2 - 1 = 0
        proj = torch.cos(theta) * ox + torch.sin(theta) * oy
        t = proj + torch.sqrt(proj * proj + 1.0 - s * s)
        return torch.minimum(base(theta), t)

    return Aperture(name, fn, params)


def cat_eye(strength: float = 0.5, direction_deg: float = 0.0) -> Aperture:
    """The round pupil with cat's-eye vignetting (see `vignetted`)."""
    ap = vignetted(circle(), strength, direction_deg)
    ap.params = {"shape": "cat_eye", "strength": float(strength), "direction_deg": float(direction_deg)}
    ap.name = "cat-eye"
    return ap


def annular(inner_ratio: float = 0.45, outer: "Aperture | None" = None) -> Aperture:
    """Ring aperture, as a mirror (catadioptric) lens: `outer` (default a circle) with a round central
    obstruction of inner_ratio times the circumradius. Its out-of-focus highlights are rings."""
    a = float(inner_ratio)
    if not (math.isfinite(a) and 0.0 <= a <= 0.95):
        raise InputError(f"Annular inner_ratio must be in [0, 0.95], got {inner_ratio}.")
    base = outer if outer is not None else circle()
    if a == 0.0:
        return base

    def edge(dx, dy, r):
        return torch.maximum(base.edge(dx, dy, r), a * r - torch.hypot(dx, dy))

    return Aperture("annular", None, {**base.params, "shape": "annular", "inner_ratio": a}, edge=edge)


def from_image(mask, threshold: float = 0.5, circumradius_px: float | None = None) -> Aperture:
    """Any user shape from an image or mask (array/tensor [H,W], [H,W,C], PIL image; bright = open),
    kept exactly as drawn: holes, rings, notches and separate parts stay (the outline is where the
    bilinearly interpolated mask crosses `threshold`).

    The shape is centred on its area centroid and scaled to circumradius 1. circumradius_px: the
    mask's own circumradius in pixels if known (e.g. (n - 1) / 2 for an n x n kernel whose shape
    touches its border); default: the largest distance from the centroid to the outline. An image with
    nothing in it is an InputError.
    """
    threshold = finite_number(threshold, "Aperture shape threshold")
    from .images import to_map_batch
    m = to_map_batch(mask, "aperture shape")
    if m.shape[0] != 1:
        raise InputError(f"Aperture shape: expected a single mask, got a batch of {m.shape[0]}.")
    m = m[0].to(torch.float64)
    if not torch.isfinite(m).all():
        raise InputError("Aperture shape contains NaN or infinite values.")
    top = float(m.max())
    if top > 1.0:  # e.g. 0..255 data
        m = m / top
    if float(m.max()) <= 0.0 or float((m > threshold).sum()) == 0:
        raise InputError("Aperture shape image is empty: nothing brighter than the threshold "
                         f"{threshold}. Use white (bright) for the open part of the aperture.")
    h, w = m.shape
    weights = m.clamp(0, 1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    cx = float((weights * xs).sum() / weights.sum())
    cy = float((weights * ys).sum() / weights.sum())
    field = _MaskField(m, float(threshold), cx, cy, circumradius_px)
    return Aperture("custom", None, {"shape": "custom", "size": [int(h), int(w)]},
                    mask=m.numpy().astype(np.float32), edge=field.edge)


# Long side (cells) of the grid on which a user mask's signed distance field is computed.
_MASK_GRID = 192
# Up to this many (cell, outline point) pairs the distance field is computed exactly.
_EXACT_PAIRS = 60_000_000


def _distance_to_points(points: torch.Tensor, shape: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """Distance [h, w] from each cell centre (x, y integer) to the nearest of `points` [P, 2] (x, y in cell
    units), axes scaled by `scale`. Exact (all pairs) up to _EXACT_PAIRS pairs; beyond (masks of noise)
    jump flooding: each cell keeps the nearest point seen, offered by its neighbours at steps h/2, h/4
    ... 1 (and 1 again), O(cells log cells), within about a cell of the exact distance."""
    h, w = shape
    sx, sy = scale
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    if points.shape[0] * h * w <= _EXACT_PAIRS:
        axes = torch.tensor([sx, sy], dtype=torch.float64)
        cells = torch.stack([xs.flatten(), ys.flatten()], 1) * axes
        return torch.cat([torch.cdist(c, points * axes).amin(1) for c in cells.split(4096)]).view(h, w)

    def dist_to(px, py):
        return torch.hypot((px - xs) * sx, (py - ys) * sy)

    # seed: each point in the cell it lies nearest to, the point nearest the centre winning
    cx, cy = points[:, 0].round().long().clamp(0, w - 1), points[:, 1].round().long().clamp(0, h - 1)
    cell = cy * w + cx
    d = torch.hypot((points[:, 0] - cx) * sx, (points[:, 1] - cy) * sy)
    nearest = torch.full((h * w,), math.inf, dtype=torch.float64).scatter_reduce(0, cell, d, "amin")
    win = d <= nearest[cell]
    best_x = torch.full((h * w,), math.nan, dtype=torch.float64)
    best_y = best_x.clone()
    best_x[cell[win]], best_y[cell[win]] = points[win, 0], points[win, 1]
    best_x, best_y = best_x.view(h, w), best_y.view(h, w)
    best = torch.where(torch.isnan(best_x), math.inf, dist_to(best_x, best_y))
    step = 1 << max(0, (max(h, w) - 1).bit_length() - 1)
    steps = []
    while step >= 1:
        steps.append(step)
        step //= 2
    for k in steps + [1]:
        for dy in (-k, 0, k):
            for dx in (-k, 0, k):
                if dy == 0 and dx == 0:
                    continue
                ox = _shifted(best_x, dy, dx)
                oy = _shifted(best_y, dy, dx)
                cand = torch.where(torch.isnan(ox), math.inf, dist_to(ox, oy))
                better = cand < best
                best = torch.where(better, cand, best)
                best_x, best_y = torch.where(better, ox, best_x), torch.where(better, oy, best_y)
    return best


def _shifted(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """t moved so that out[y, x] = t[y + dy, x + dx]; NaN where that lies outside."""
    h, w = t.shape
    out = torch.full_like(t, math.nan)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = t[ys, xs]
    return out


class _MaskField:
    """Signed distance (in circumradius units) to the outline of a mask, on a grid of about _MASK_GRID
    cells: the outline is located to sub-cell precision where the interpolated mask crosses the
    threshold, and each cell gets its distance to the nearest outline point (negative inside)."""

    def __init__(self, m: torch.Tensor, threshold: float, cx: float, cy: float, circumradius_px):
        h, w = m.shape
        f = _MASK_GRID / max(h, w)
        size = (max(1, round(h * f)), max(1, round(w * f)))
        fine = F.interpolate(m[None, None], size=size, mode="bilinear" if f >= 1 else "area",
                             **({"align_corners": False} if f >= 1 else {}))[0, 0]
        fy, fx = size[0] / h, size[1] / w
        v = F.pad(fine, (1, 1, 1, 1)) - threshold  # a closed cell border: outside the image is closed
        pts = []
        for a, b, along in ((v[:, :-1], v[:, 1:], "x"), (v[:-1, :], v[1:, :], "y")):
            iy, ix = torch.nonzero((a > 0) != (b > 0), as_tuple=True)
            va, vb = a[iy, ix], b[iy, ix]
            t = va / (va - vb)
            py, px = (iy.double(), ix.double() + t) if along == "x" else (iy.double() + t, ix.double())
            pts.append(torch.stack([px, py], 1))
        # outline points in mask pixels (cell centre i of the padded grid is mask coordinate (i - 1 + 0.5) / f - 0.5)
        p = torch.cat(pts)
        p_mask = torch.stack([(p[:, 0] - 0.5) / fx - 0.5, (p[:, 1] - 0.5) / fy - 0.5], 1)
        reach = float(torch.hypot(p_mask[:, 0] - cx, p_mask[:, 1] - cy).max())
        if circumradius_px is not None:
            if not (float(circumradius_px) > 0):
                raise InputError(f"circumradius_px must be positive, got {circumradius_px}.")
            reach = float(circumradius_px)
        self.R, self.cx, self.cy, self.fx, self.fy = reach, cx, cy, fx, fy
        dist = _distance_to_points(p, v.shape, (1.0 / fx, 1.0 / fy))  # in mask pixels
        self.sdf = torch.where(v > 0, -dist, dist) / reach  # circumradius units

    def edge(self, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
        r = max(float(radius), 1e-6)
        # offsets at circumradius r -> padded grid cells
        gx = ((self.cx + dx / r * self.R) + 0.5) * self.fx + 0.5
        gy = ((self.cy + dy / r * self.R) + 0.5) * self.fy + 0.5
        H, W = self.sdf.shape
        cxg, cyg = gx.clamp(0, W - 1), gy.clamp(0, H - 1)
        x0, y0 = cxg.floor().clamp(max=W - 2), cyg.floor().clamp(max=H - 2)
        tx, ty = cxg - x0, cyg - y0
        x0, y0 = x0.long(), y0.long()
        sdf = self.sdf.to(dx.dtype)
        val = ((sdf[y0, x0] * (1 - tx) + sdf[y0, x0 + 1] * tx) * (1 - ty)
               + (sdf[y0 + 1, x0] * (1 - tx) + sdf[y0 + 1, x0 + 1] * tx) * ty)
        outside = torch.hypot((gx - cxg) / self.fx, (gy - cyg) / self.fy) / self.R  # beyond the grid
        return (val + outside) * r


SHAPES = ("circle", "polygon", "triangle", "star", "heart", "cat_eye", "annular")


def make_aperture(shape: str = "circle", *, blades: int = 6, rotation_deg: float = 0.0, curvature: float = 0.0,
                  points: int = 5, inner_ratio: float = 0.5, strength: float = 0.5, direction_deg: float = 0.0,
                  hole_ratio: float = 0.45, mask=None, threshold: float = 0.5) -> Aperture:
    """Build an aperture by name from the settings of all shapes (each shape reads its own; the node and
    the CLI pass everything they have): circle | polygon (blades, rotation_deg, curvature) | hexagon |
    pentagon | triangle (rotation_deg) | star (points, inner_ratio, rotation_deg) | heart (rotation_deg) |
    cat_eye (strength, direction_deg) | annular (hole_ratio: a mirror lens's central obstruction) |
    custom (mask, threshold: any image, kept as drawn)."""
    name = str(shape).lower().replace("-", "_")
    if name in ("hexagon", "pentagon"):
        return polygon(6 if name == "hexagon" else 5, rotation_deg, curvature)
    builders = {
        "circle": lambda: circle(),
        "polygon": lambda: polygon(blades, rotation_deg, curvature),
        "triangle": lambda: triangle(rotation_deg),
        "star": lambda: star(points, inner_ratio, rotation_deg),
        "heart": lambda: heart(rotation_deg),
        "cat_eye": lambda: cat_eye(strength, direction_deg),
        "annular": lambda: annular(hole_ratio),
        "custom": lambda: from_image(mask, threshold=threshold),
    }
    if name not in builders:
        raise InputError(f"Unknown aperture shape {shape!r}; choose one of {', '.join(SHAPES)}, hexagon, pentagon, "
                         "custom.")
    if name == "custom" and mask is None:
        raise InputError("The custom aperture needs a mask or image (white = open).")
    return builders[name]()
