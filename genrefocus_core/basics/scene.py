"""Procedural test scene with exact metric depth: the built-in source for the demo and the nodes.

A night-ish street of textured surfaces at several depths: a far wall of lit windows with point
lights (so aperture shapes show in the bokeh), a receding ground plane, a mid-distance pillar, a
near card with a checker texture and a string of small lights, all with hard occlusion edges. The
camera is a pinhole; depth is the z distance in metres of the surface seen at each pixel. The same
seed gives the same scene at any size (the layout is in fractions of the frame).

`make_scene_clip` makes a short clip of it for focus pulls and video depth: the camera stands still
and a round sign enters from the left edge at SIGN_M, so later frames hold a surface the first ones
do not.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import InputError
from .files import check_fits_in_memory

# Depths (m) of the scene's planes.
FAR_WALL_M = 20.0
PILLAR_M = 6.0
CARD_M = 1.6
LIGHTS_M = 3.0
HORIZON = 0.55  # fraction of the height where the ground meets the far wall
CAMERA_HEIGHT_M = 1.4
SIGN_M = 2.5  # the round sign entering the clip
MAX_CLIP_FRAMES = 1000


# Peak memory of make_scene per pixel (float64 layers and masks; measured with tracemalloc: ~260 B).
SCENE_BYTES_PER_PIXEL = 300

def scene_landmarks(height: int, width: int) -> dict[str, tuple[int, int]]:
    """Named (x, y) pixels on the scene's main surfaces (for focus points)."""
    return {
        "near card": (int(0.2 * width), int(0.72 * height)),
        "lights": (int(0.62 * width), int(0.30 * height)),
        "pillar": (int(0.78 * width), int(0.62 * height)),
        "far wall": (int(0.30 * width), int(0.45 * height)),
    }


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1]: random values on a grid of `cell` px, bilinearly interpolated."""
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    grid = rng.random((gh, gw))
    y = np.arange(h) / cell
    x = np.arange(w) / cell
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _disc(yy, xx, cy, cx, r):
    """Anti-aliased disc coverage (1-px soft edge)."""
    return np.clip(r + 0.5 - np.hypot(yy - cy, xx - cx), 0.0, 1.0)


def check_scene_request(height, width, seed) -> tuple[int, int]:
    """(height, width) as ints when a scene of that size and seed can be made here, else InputError
    (the demo checks before it creates its output folder)."""
    height, width = int(height), int(width)
    if height < 8 or width < 8:
        raise InputError(f"Scene size must be at least 8x8 px, got {width}x{height}.")
    if height * width > 64_000_000:
        raise InputError(f"Scene size {width}x{height} is too large (at most 64 megapixels).")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise InputError(f"Scene seed must be a whole number >= 0, got {seed!r}.")
    check_fits_in_memory(height * width * SCENE_BYTES_PER_PIXEL, f"A {width}x{height} test scene")
    return height, width


def make_scene(height: int = 384, width: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (image [1,H,W,3] float32 sRGB in [0,1], depth_m [1,H,W] float32 metres, all finite > 0)."""
    height, width = check_scene_request(height, width, seed)
    rng = np.random.default_rng(int(seed))
    H, W = height, width
    s = min(H, W) / 384.0  # feature scale
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.zeros((H, W, 3))
    depth = np.full((H, W), FAR_WALL_M)

    # far wall: dusk gradient, brick-ish texture, lit windows, point lights
    hue = rng.uniform(0.0, 1.0)
    base = np.array([0.10 + 0.08 * hue, 0.12, 0.22 - 0.08 * hue])
    wall = base[None, None] * (0.6 + 0.5 * _smooth_noise(rng, H, W, 24 * s))[..., None]
    bricks = ((np.floor(yy / (6 * s)) + np.floor(xx / (14 * s) + 0.5 * (np.floor(yy / (6 * s)) % 2))) % 2)
    wall *= (0.85 + 0.15 * bricks)[..., None]
    img[:] = wall
    n_win = 7
    for i in range(n_win):
        cx = (i + 0.5 + rng.uniform(-0.2, 0.2)) * W / n_win
        cy = rng.uniform(0.12, 0.35) * H
        hw, hh = rng.uniform(8, 16) * s, rng.uniform(10, 20) * s
        m = (np.abs(xx - cx) < hw) & (np.abs(yy - cy) < hh)
        warm = np.array([1.0, rng.uniform(0.55, 0.8), rng.uniform(0.2, 0.45)])
        img[m] = warm * rng.uniform(0.55, 0.85)
    for _ in range(int(40 * (W / 512))):
        cx, cy = rng.uniform(0, W), rng.uniform(0.05, HORIZON - 0.03) * H
        cov = _disc(yy, xx, cy, cx, max(0.9, rng.uniform(0.8, 1.6) * s))
        col = np.array([1.0, 1.0, 1.0]) if rng.random() < 0.5 else np.array([1.0, rng.uniform(0.6, 0.9), 0.4])
        img = img * (1 - cov[..., None]) + col * cov[..., None]

    # ground plane below the horizon: depth from the camera height, stone texture
    horizon_y = HORIZON * H
    focal_px = 0.9 * W
    below = yy > horizon_y + 0.5
    ground_depth = CAMERA_HEIGHT_M * focal_px / np.maximum(yy - horizon_y, 0.5)
    ground = below & (ground_depth < FAR_WALL_M)
    gz = np.where(ground, ground_depth, FAR_WALL_M)
    gx = (xx - W / 2) * gz / focal_px  # metres across
    tiles = ((np.floor(gx / 0.5) + np.floor(gz / 0.5)) % 2)
    stone = np.array([0.30, 0.27, 0.24])[None, None] * (0.75 + 0.25 * tiles)[..., None]
    stone *= (0.8 + 0.3 * _smooth_noise(rng, H, W, 10 * s))[..., None]
    img[ground] = stone[ground]
    depth[ground] = gz[ground]

    # mid pillar standing on the ground (occludes wall and ground)
    px0, px1 = 0.70 * W, 0.86 * W
    foot = horizon_y + CAMERA_HEIGHT_M * focal_px / PILLAR_M
    pillar = (xx >= px0) & (xx < px1) & (yy < foot) & (yy > 0.08 * H)
    grain = 0.75 + 0.25 * np.sin(xx / (3.0 * s) + 3 * _smooth_noise(rng, H, W, 30 * s))
    pcol = np.array([0.62, 0.55, 0.45])[None, None] * grain[..., None]
    img[pillar] = pcol[pillar]
    depth[pillar] = PILLAR_M

    # a string of small lights at mid distance (in front of wall and pillar)
    for i in range(12):
        t = i / 11.0
        cx = (0.40 + 0.45 * t) * W
        cy = (0.22 + 0.10 * np.sin(np.pi * t)) * H
        cov = _disc(yy, xx, cy, cx, max(1.2, 1.8 * s))
        col = np.array([[1.0, 0.85, 0.5], [0.6, 0.9, 1.0], [1.0, 0.5, 0.6]][i % 3])
        img = img * (1 - cov[..., None]) + col * cov[..., None]
        depth = np.where(cov > 0.5, LIGHTS_M, depth)

    # near card: checker + colour gradient, tilted slightly in depth (left nearer)
    cx0, cx1, cy0, cy1 = 0.05 * W, 0.38 * W, 0.55 * H, 0.95 * H
    card = (xx >= cx0) & (xx < cx1) & (yy >= cy0) & (yy < cy1)
    check = ((np.floor((xx - cx0) / (12 * s)) + np.floor((yy - cy0) / (12 * s))) % 2)
    u = (xx - cx0) / (cx1 - cx0)
    ccol = np.stack([0.85 - 0.5 * u, 0.25 + 0.5 * u, 0.3 + 0.2 * check], -1) * (0.55 + 0.45 * check)[..., None]
    img[card] = ccol[card]
    depth[card] = (CARD_M * (0.9 + 0.2 * u))[card]

    image = torch.from_numpy(np.clip(img, 0.0, 1.0).astype(np.float32))[None]
    depth_t = torch.from_numpy(depth.astype(np.float32))[None]
    return image, depth_t


def make_scene_clip(height: int = 384, width: int = 512, frames: int = 24,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The scene as a clip -> (images [N,H,W,3], depth_m [N,H,W]), exact depth in every frame.

    A round sign (radius 0.16 of the height, at SIGN_M, behind the near card) slides in from the left:
    wholly outside the frame in frame 0, its centre at 0.45 of the width in the last frame (a single
    frame: frame 0).
    """
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or not 1 <= frames <= MAX_CLIP_FRAMES:
        raise InputError(f"Clip length must be a whole number of frames in [1, {MAX_CLIP_FRAMES}], got {frames!r}.")
    image, depth = make_scene(height, width, seed)
    H, W = image.shape[1:3]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    r, cy = 0.16 * H, 0.5 * H
    first = image[0].numpy().astype(np.float64)
    images, depths = [first], [depth[0].numpy()]
    behind = depths[0] > SIGN_M
    for f in range(1, int(frames)):
        cx = -r - 1.0 + (0.45 * W + r + 1.0) * f / (frames - 1)
        dist = np.hypot(yy - cy, xx - cx)
        cov = (_disc(yy, xx, cy, cx, r) * behind)[..., None]  # the near card stays in front of it
        col = np.stack([0.95 - 0.3 * dist / r, 0.18 + 0.1 * dist / r, np.full_like(dist, 0.12)], -1)
        col *= (0.75 + 0.25 * np.cos(dist / (0.02 * H)))[..., None]  # rings: texture that shows the blur
        images.append(first * (1 - cov) + col * cov)
        depths.append(np.where(cov[..., 0] > 0.5, np.float32(SIGN_M), depths[0]))
    imgs = torch.from_numpy(np.clip(np.stack(images), 0.0, 1.0).astype(np.float32))
    return imgs, torch.from_numpy(np.stack(depths).astype(np.float32))
