"""Depth from other sources: depth/disparity maps from other ComfyUI nodes or files -> the core's
disparity convention (1/m, bigger = nearer; 0 = infinitely far).

What a map means cannot be guessed from its pixels, so the caller says it:
- kind: "depth" (bigger = farther: ZoeDepth, Marigold, Depth Pro, sensor depth) or "disparity"
  (inverse depth, bigger = nearer: Depth Anything, MiDaS, DPT).
- near: "auto" (the kind's own orientation), "bright" or "dark": which end of the map is near. A
  map displayed the other way round than its kind (e.g. depth shown with near = bright) is flipped
  within its value range first; only relative maps can be flipped.
- scale: "metric" (values are metres, or 1/m for disparity, times `unit`) or "relative" (known
  only up to scale and shift, as most monocular depth networks give).

Relative maps are placed in a typical photographed scene, `near_m`..`far_m` (default 1..20 m):
the nearest value becomes near_m, the farthest far_m. Relative disparity is mapped linearly onto
disparity [1/far_m, 1/near_m] and relative depth linearly onto depth [near_m, far_m] (each stays
affine in its own quantity, which is what the networks predict). Depth Pro's disparity on ordinary
photos mostly spans about 0.05..1 1/m, so the blur level K keeps about the same meaning whichever
source the depth came from; give near_m/far_m to match a known scene.

A batch of relative maps (the frames of a clip) is normalised with ONE value range (normalization
"batch", the default), so an object entering a later frame does not rescale the depth, and so the
blur, of everything else; "smoothed" lets the range follow the clip slowly (see `value_ranges`);
"per_image" normalises every map on its own (for unrelated images). A map that a depth node has
already normalised per frame cannot be repaired here: use the node's raw output. Metric maps are
never normalised.
"""
from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..basics.defocus import require_positive_depth
from ..basics.errors import InputError, finite_number
from ..basics.files import read_npy
from ..basics.images import fill_with_median, is_channels_first, is_single_map_hw1, open_image, resize_map

log = logging.getLogger(__name__)

DEFAULT_NEAR_M = 1.0
DEFAULT_FAR_M = 20.0
# The channels of an RGB depth image must agree on average to this fraction of full scale (JPEG noise
# on a grey image stays well below), else it is a colour-mapped visualisation that cannot be read back.
_GREY_TOLERANCE = 4.0 / 255.0
# A map whose aspect ratio differs from the image's by more than this is not the image's depth map.
_ASPECT_TOLERANCE = 0.02

_KINDS = ("depth", "disparity")
_NEARS = ("auto", "bright", "dark")
_SCALES = ("relative", "metric")
NORMALIZATIONS = ("batch", "smoothed", "per_image")
DEFAULT_SMOOTHING_FRAMES = 8


def _pil_stored_values(img) -> np.ndarray:
    """PIL image -> numpy keeping stored values (16-bit stays 0..65535, float stays float)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.uint16)
    if img.mode in ("I", "F", "L", "RGB", "LA", "RGBA"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


def read_map(x, name: str = "depth map", size=None) -> torch.Tensor:
    """Any single-channel-like map -> float32 [B, H, W] with its stored values (no rescaling).

    Accepts torch tensors and numpy arrays ([H,W], [B,H,W], [B,H,W,C] with C in 1/3/4, [B,1,H,W]),
    PIL images, and ComfyUI IMAGE/MASK tensors. A 3-D torch tensor is a batch [B,H,W] (ComfyUI MASK),
    a 3-D numpy array with 1, 3 or 4 in its last dimension is [H,W,C]; `size`, the (H, W) of the image
    the map belongs to, settles shapes that fit only one reading (`images.is_single_map_hw1`).
    Integer data keeps its codes (a 16-bit PNG in millimetres stays in millimetres). An RGB(A) map
    must be grey (equal channels); alpha is ignored. NaN values are kept (see
    `disparity_from_external`).
    """
    if isinstance(x, Image.Image):
        x = _pil_stored_values(x)
    channels_last_3d = True  # numpy/PIL: a 3-D array is [H,W,C]
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number):
            raise InputError(f"{name}: expected numbers, got an array of {x.dtype}.")
        t = torch.from_numpy(np.ascontiguousarray(x).astype(np.float32))
    elif isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise InputError(f"{name}: expected a real-valued tensor, got {x.dtype}.")
        t = x.detach().float()
        channels_last_3d = False  # torch: a 3-D tensor is a ComfyUI MASK batch [B,H,W] (as to_map_batch)
    else:
        raise InputError(f"{name}: expected a tensor, numpy array or PIL image, got {type(x).__name__}.")

    if t.ndim == 2:
        t = t[None, :, :, None]
    elif t.ndim == 3:
        if (t.shape[-1] == 1 and is_single_map_hw1(t.shape, size, channels_last_3d)) or \
                (channels_last_3d and t.shape[-1] in (3, 4)):
            t = t[None]  # [H,W,C]
        else:
            t = t[..., None]  # [B,H,W]
    elif t.ndim == 4:
        if is_channels_first(t.shape, size):
            t = t.permute(0, 2, 3, 1)  # [B,1,H,W]
        elif t.shape[-1] not in (1, 3, 4):
            raise InputError(f"{name}: cannot tell the channels of shape {tuple(t.shape)}; "
                             "expected [B,H,W,C] with C = 1, 3 or 4, or [B,1,H,W].")
    else:
        raise InputError(f"{name}: expected [H,W], [H,W,C], [B,H,W] or [B,H,W,C], got shape {tuple(t.shape)}.")
    if 0 in t.shape:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)}).")
    channels = t.shape[-1]
    if channels >= 3:
        rgb = t[..., :3]
        finite = torch.isfinite(rgb).all(-1)
        if finite.any():
            vals = rgb[finite]
            vmax = float(vals.abs().max())
            full_scale = 1.0 if vmax <= 1.0 else 255.0 if vmax <= 255.0 else 65535.0 if vmax <= 65535.0 else vmax
            spread = float((vals.amax(-1) - vals.amin(-1)).mean())
            if spread > _GREY_TOLERANCE * full_scale:
                raise InputError(f"{name} is a colour image (its R, G and B differ): a colour-mapped depth "
                                 "visualisation cannot be read back into depth. Use the depth node's greyscale "
                                 "output (or its raw depth).")
        t = rgb.mean(-1)
    else:
        t = t[..., 0]
    return t.contiguous()


def _check_choice(value, choices, what):
    if value not in choices:
        raise InputError(f"{what} must be one of {', '.join(choices)}; got {value!r}.")


def _fill_nan(disp: torch.Tensor, name: str) -> torch.Tensor:
    """Unknown (NaN) pixels get the median disparity of their image's known pixels (warned)."""
    nan = torch.isnan(disp)
    if not nan.any():
        return disp
    out = fill_with_median(disp, nan, name + " is NaN everywhere (image {b}): it holds no depth; check the depth node.")
    log.warning("%s: %d unknown (NaN) pixels filled with the median disparity.", name, int(nan.sum()))
    return out


def _fit_size(disp: torch.Tensor, size, batch, name: str) -> torch.Tensor:
    if batch is not None and disp.shape[0] != batch:
        if disp.shape[0] != 1:
            raise InputError(f"{name}: batch of {disp.shape[0]} maps does not match the {batch} images.")
        disp = disp.expand(batch, -1, -1)
    if size is None or tuple(disp.shape[-2:]) == tuple(size):
        return disp.contiguous()
    h, w = disp.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if abs(math.log((w / h) / (tw / th))) > _ASPECT_TOLERANCE:
        raise InputError(f"{name} is {w}x{h} but the image is {tw}x{th}: different aspect ratios, so the map "
                         "belongs to another image or was cropped. Give the depth map of this image.")
    return resize_map(disp.contiguous(), (th, tw), mode="bilinear")


def disparity_from_external(image_or_map, kind: str = "disparity", near: str = "auto", scale: str = "relative",
                            near_m: float = DEFAULT_NEAR_M, far_m: float = DEFAULT_FAR_M, unit: float = 1.0,
                            size: tuple[int, int] | None = None, batch: int | None = None,
                            name: str = "depth map", normalization: str = "batch",
                            smoothing_frames: int = DEFAULT_SMOOTHING_FRAMES) -> torch.Tensor:
    """An external depth or disparity map -> disparity [B, H, W] in 1/m (bigger = nearer).

    image_or_map: ComfyUI IMAGE [B,H,W,3] (grey), MASK [B,H,W], numpy (uint8/uint16/float), PIL
      image, or a tensor from `load_depth_file`.
    kind, near, scale, near_m, far_m: what the map means (module docstring).
    unit: metric maps only: metres per stored unit (0.001 for millimetres; for a ComfyUI image in
      [0, 1] that encodes 0..10 m, 10).
    size: (H, W) of the image the map belongs to; a map of another size with the same aspect ratio
      is resized (bilinear, on disparity); another aspect ratio is an error.
    batch: the image batch; a single map is repeated to it.
    normalization, smoothing_frames: relative maps only: how the value range of a batch is found
      (module docstring, `value_ranges`).

    Handling: NaN pixels are unknown and get the image's median disparity (warned); metric depth
    <= 0 or +inf means infinitely far (disparity 0), negative metric disparity is an error. A map
    that is constant (e.g. all zero), or whose metric depth is nowhere positive and finite, holds
    no depth and is an error, as is a map that is NaN everywhere.
    """
    _check_choice(kind, _KINDS, "kind")
    _check_choice(near, _NEARS, "near")
    _check_choice(scale, _SCALES, "scale")
    _check_choice(normalization, NORMALIZATIONS, "normalization")
    values = read_map(image_or_map, name, size)
    for b in range(values.shape[0]):
        if torch.isnan(values[b]).all():
            raise InputError(f"{name} is NaN everywhere (image {b}): it holds no depth; check the depth node.")

    natural = "dark" if kind == "depth" else "bright"
    flipped = near not in ("auto", natural)
    if scale == "metric":
        if flipped:
            raise InputError(f"{name}: metric {kind} has a fixed direction ({'far' if kind == 'depth' else 'near'} = "
                             "bigger values); an inverted (display) map can only be used with scale='relative'.")
        unit = finite_number(unit, "unit")
        if unit <= 0:
            raise InputError(f"unit must be a positive number of metres per stored unit, got {unit!r}.")
        disp = _metric_to_disparity(values, kind, unit, name)
    else:
        near_m, far_m = finite_number(near_m, "near_m"), finite_number(far_m, "far_m")
        if not (0 < near_m < far_m):
            raise InputError(f"Scene range must satisfy 0 < near_m < far_m (metres), got near_m={near_m}, "
                             f"far_m={far_m}.")
        lo, hi = value_ranges(values, normalization, smoothing_frames, name)
        disp = _relative_to_disparity(values, kind, flipped, near_m, far_m, lo, hi)
    disp = _fill_nan(disp, name)
    return _fit_size(disp, size, batch, name)


def depth_from_external(image_or_map, **options) -> torch.Tensor:
    """Like `disparity_from_external` but returns metric depth [B, H, W] in metres (+inf where the
    disparity is 0, i.e. infinitely far)."""
    disp = disparity_from_external(image_or_map, **options)
    return torch.where(disp > 0, 1.0 / disp.clamp_min(1e-12), torch.full_like(disp, float("inf")))


def _metric_to_disparity(values: torch.Tensor, kind: str, unit: float, name: str) -> torch.Tensor:
    nan = torch.isnan(values)
    if kind == "depth":
        depth = values * unit
        valid = require_positive_depth(depth, name)
        disp = torch.where(valid, 1.0 / depth.clamp_min(1e-12), torch.zeros_like(depth))
    else:
        if torch.isinf(values).any():
            raise InputError(f"{name}: infinite disparity (a point at zero distance); check the map.")
        if (values < 0).any():
            raise InputError(f"{name}: negative metric disparity ({float(values[~nan].min()):g}); a metric disparity "
                             "map holds 1/distance >= 0. Is it a relative map (scale='relative')?")
        disp = values / unit
        for b in range(values.shape[0]):
            known = disp[b][~nan[b]]
            if known.numel() and not (known > 0).any():
                raise InputError(f"{name} (image {b}) is zero everywhere: every point infinitely far, no depth; "
                                 "check the depth node.")
    return torch.where(nan, values, disp)  # NaN stays unknown for _fill_nan


def value_ranges(values: torch.Tensor, normalization: str = "batch",
                 smoothing_frames: int = DEFAULT_SMOOTHING_FRAMES,
                 name: str = "depth map") -> tuple[torch.Tensor, torch.Tensor]:
    """The (lowest, highest) value [B] each relative map is normalised with; NaN pixels are ignored.

    - "per_image": each map's own range.
    - "batch": the whole batch's range for every map.
    - "smoothed": each map's range widened to the extremes of the maps within `smoothing_frames` frames
      of it (running min / max), then averaged over that window with Gaussian weights (sigma = half
      the window, renormalised at the clip's ends). Every value of the window is at least as extreme
      as the map's own, so the average still contains the map's range (no value leaves [lo, hi]),
      and an object entering at frame k changes the range gradually from frame k - 2 * smoothing_frames
      on instead of at once. smoothing_frames = 0 is "per_image".
    A range of zero width (a constant map, or a constant batch) holds no depth and is an error;
    under "batch"/"smoothed" a constant map in a varying batch is normalised with its neighbours'
    range (a frame filled by one surface is legitimate in a clip).
    """
    _check_choice(normalization, NORMALIZATIONS, "normalization")
    if isinstance(smoothing_frames, bool) or not isinstance(smoothing_frames, (int, np.integer)) or smoothing_frames < 0:
        raise InputError(f"smoothing_frames must be a whole number of frames >= 0, got {smoothing_frames!r}.")
    if torch.isinf(values).any():
        raise InputError(f"{name}: infinite values in a relative map; check the map.")
    B = values.shape[0]
    flat = values.reshape(B, -1).double()
    known = ~torch.isnan(flat)
    for b in range(B):
        if not known[b].any():
            raise InputError(f"{name} is NaN everywhere (image {b}): it holds no depth; check the depth node.")
    lo = torch.where(known, flat, torch.full_like(flat, math.inf)).amin(1)
    hi = torch.where(known, flat, torch.full_like(flat, -math.inf)).amax(1)
    if normalization == "batch":
        lo, hi = lo.min().expand(B), hi.max().expand(B)
    elif normalization == "smoothed" and smoothing_frames > 0 and B > 1:
        r = int(smoothing_frames)
        offsets = torch.arange(-r, r + 1)
        window = torch.arange(B)[:, None] + offsets[None]  # [B, 2r+1] frame indices around each frame
        inside = (window >= 0) & (window < B)
        window = window.clamp(0, B - 1)  # outside frames repeat the end frame; their weight is 0
        run_lo, run_hi = lo[window].amin(1), hi[window].amax(1)
        w = torch.exp(-0.5 * (offsets.double() / (r / 2.0)) ** 2)[None] * inside
        w = w / w.sum(1, keepdim=True)
        lo = (w * run_lo[window]).sum(1).minimum(lo)  # min/max only absorb rounding: the average already contains
        hi = (w * run_hi[window]).sum(1).maximum(hi)  # the frame's range
    for b in range(B):
        if float(hi[b] - lo[b]) <= 1e-12 * max(1.0, float(hi[b].abs())):
            raise InputError(f"{name} (image {b}) is constant (every pixel {float(lo[b]):g}): it holds no depth; "
                             "check the depth node's output.")
    return lo.float(), hi.float()


def _relative_to_disparity(values: torch.Tensor, kind: str, flipped: bool, near_m: float, far_m: float,
                           lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Relative values -> disparity, with the value range [lo, hi] per map (`value_ranges`)."""
    t = (values - lo.view(-1, 1, 1)) / (hi - lo).view(-1, 1, 1)  # 0..1 in the map's own direction; NaN stays
    if flipped:
        t = 1.0 - t
    if kind == "disparity":  # t = 1 nearest
        return (1.0 - t) / far_m + t / near_m
    return 1.0 / (near_m + t * (far_m - near_m))  # depth: t = 0 nearest


# ----------------------------------------------------------------------------------------------
# Files


def _read_pfm(path: Path) -> np.ndarray:
    """Portable float map (MiDaS, Middlebury): 'Pf' grey / 'PF' colour, rows stored bottom-up."""
    with open(path, "rb") as f:
        header = f.readline().strip()
        if header not in (b"Pf", b"PF"):
            raise InputError(f"{path} is not a PFM file (header {header[:10]!r}).")
        dims = f.readline().split()
        scale_line = f.readline().strip()
        try:
            width, height = int(dims[0]), int(dims[1])
            scale = float(scale_line)
        except (IndexError, ValueError):
            raise InputError(f"{path}: malformed PFM header.") from None
        channels = 3 if header == b"PF" else 1
        dtype = "<f4" if scale < 0 else ">f4"
        data = np.frombuffer(f.read(), dtype=dtype)
    if data.size < width * height * channels:
        raise InputError(f"{path} is truncated ({data.size} of {width * height * channels} values).")
    arr = data[: width * height * channels].reshape(height, width, channels)[::-1]
    return (arr[..., 0] if channels == 1 else arr).astype(np.float32)


def _read_exr(path: Path) -> np.ndarray:
    """First of the channels Z / depth / Y / R (or the only one) of an OpenEXR file."""
    try:
        import OpenEXR
    except ImportError:
        raise InputError(f"Reading {path.name} needs the OpenEXR Python package: pip install OpenEXR "
                         "(or save the depth as .npy, .pfm, 16-bit PNG or float TIFF).") from None
    preferred = ("Z", "depth", "Depth", "Y", "R", "V")
    try:
        if hasattr(OpenEXR, "File"):  # OpenEXR >= 3.3
            with OpenEXR.File(str(path)) as f:
                channels = f.channels()
                names = list(channels)
                key = next((n for n in preferred if n in channels), names[0])
                if key not in channels and len(names) == 1:
                    key = names[0]
                arr = np.asarray(channels[key].pixels, dtype=np.float32)
                if arr.ndim == 3:  # an interleaved RGB(A) channel group
                    arr = arr[..., 0]
                return arr
        import Imath  # OpenEXR 1.x API
        f = OpenEXR.InputFile(str(path))
        header = f.header()
        win = header["dataWindow"]
        width, height = win.max.x - win.min.x + 1, win.max.y - win.min.y + 1
        names = list(header["channels"])
        key = next((n for n in preferred if n in names), names[0])
        raw = f.channel(key, Imath.PixelType(Imath.PixelType.FLOAT))
        return np.frombuffer(raw, dtype=np.float32).reshape(height, width).copy()
    except InputError:
        raise
    except Exception as e:  # the bindings raise plain Exception/OSError for unreadable files
        raise InputError(f"Cannot read the EXR file {path}: {e}") from None


def load_depth_file(path) -> torch.Tensor:
    """A depth or disparity file -> float32 [1, H, W] with the file's stored values (no rescaling).

    .npy (any numeric dtype; [H,W], [H,W,1] or [1,H,W]), .npz (the only array, or the one named
    'depth' / 'disparity'), .pfm, .exr (needs `pip install OpenEXR`), and PNG/TIFF images including
    16-bit and float TIFF. Integer files keep their codes: pass `unit` (e.g. 0.001 for millimetres)
    to `disparity_from_external` for metric maps. What the values mean is for the caller to say.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"Depth file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            with open(p, "rb") as f:
                arr = read_npy(f, p, p.stat().st_size)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                key = next((n for n in ("depth", "disparity") if n in names), names[0] if len(names) == 1 else None)
                if key is None:
                    raise InputError(f"{p} holds several arrays ({', '.join(names)}); name one 'depth' or 'disparity'.")
                with z.zip.open(key + ".npy") as member:
                    arr = read_npy(member, f"{p} ({key})", z.zip.getinfo(key + ".npy").file_size)
        elif suffix == ".pfm":
            arr = _read_pfm(p)
        elif suffix == ".exr":
            arr = _read_exr(p)
        else:
            with open_image(p, "Depth file") as im:
                arr = _pil_stored_values(im)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(f"Cannot read the depth file {p}: {e}") from None
    except MemoryError:
        raise InputError(f"The depth file {p} is too large for the memory of this machine.") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return read_map(arr, name=str(p))  # grey RGB(A) image; colour maps are refused there
    if arr.ndim != 2:
        raise InputError(f"{p}: expected a single 2-D map, got an array of shape {arr.shape}.")
    return read_map(arr, name=str(p))
