"""Image conversions at the core's boundary.

The core's public image type is a float32 torch tensor [B, H, W, 3] in [0, 1]: the same layout as
ComfyUI's IMAGE, so node wrappers pass tensors straight through. Anything image-like (PIL images,
numpy arrays, uint8/uint16/float, grey, RGBA, single images or batches) is accepted by
`to_image_batch`. Internally the networks use [B, 3, H, W]; `pad_to_multiple` / `crop` give any
size to a model that needs multiples of 16 and restore the exact input size afterwards.
"""
from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import GenRefocusError, InputError
from .files import check_fits_in_memory, save_pil_image


def _pil_to_image_array(img) -> np.ndarray:
    """PIL image -> numpy in an image's range: 16/32-bit integer modes scaled to 0..1, float kept, else RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(img, dtype=np.float64) / (65535.0 if img.mode.startswith("I;16") else float(np.iinfo(np.int32).max))
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    return np.asarray(img.convert("RGB"))


def _to_float01(arr: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(arr, np.ndarray):
        if arr.dtype == np.uint8:
            t = torch.from_numpy(arr.astype(np.float32) / 255.0)
        elif arr.dtype == np.uint16:
            t = torch.from_numpy(arr.astype(np.float32) / 65535.0)
        elif arr.dtype == np.bool_:
            t = torch.from_numpy(arr.astype(np.float32))
        elif np.issubdtype(arr.dtype, np.number):
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        else:
            raise InputError(f"{name}: unsupported array dtype {arr.dtype}.")
    elif isinstance(arr, torch.Tensor):
        if arr.dtype == torch.uint8:
            t = arr.float() / 255.0
        elif arr.dtype == torch.bool:
            t = arr.float()
        elif arr.is_floating_point():
            t = arr.float()
        else:
            raise InputError(f"{name}: unsupported tensor dtype {arr.dtype}.")
    else:
        raise InputError(f"{name}: expected an image (PIL image, numpy array or torch tensor), got {type(arr).__name__}.")
    if not torch.isfinite(t).all():
        raise InputError(f"{name} contains NaN or infinite values.")
    return t.clamp(0.0, 1.0)


def to_image_batch(image, name: str = "image") -> torch.Tensor:
    """Any image-like input -> float32 [B, H, W, 3] in [0, 1] (on the input's device for tensors).

    Handling, documented for users: [H,W] and [B,H,W] (last dimension not 1-4) are grey; grey images
    are repeated to RGB; an alpha channel is dropped
    (ComfyUI carries alpha as a separate MASK); integer images are scaled by their range; float values
    are clamped to [0, 1]; NaN or infinite values are an error. A list of images of equal size
    becomes a batch.
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError(f"{name}: empty list of images.")
        parts = [to_image_batch(im, name) for im in image]
        if len({p.shape[1:] for p in parts}) != 1:
            raise InputError(f"{name}: images in a batch must all have the same size.")
        return torch.cat(parts, 0)
    if isinstance(image, Image.Image):
        image = _pil_to_image_array(image)
    t = _to_float01(image, name)
    if t.ndim == 2:
        t = t[None, :, :, None]
    elif t.ndim == 3:
        t = t[None] if t.shape[-1] in (1, 2, 3, 4) else t[..., None]
    elif t.ndim != 4:
        raise InputError(f"{name}: expected [H,W], [H,W,C] or [B,H,W,C], got shape {tuple(t.shape)}.")
    c = t.shape[-1]
    if c in (1, 2):  # grey, grey + alpha
        t = t[..., :1].expand(*t.shape[:-1], 3)
    elif c == 4:
        t = t[..., :3]
    elif c != 3:
        raise InputError(f"{name}: expected 1, 3 or 4 channels in the last dimension, got {c} (shape {tuple(t.shape)}).")
    if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)}).")
    return t.contiguous()


def _fits(shape_hw, size) -> bool:
    return tuple(shape_hw) == tuple(size)


def is_single_map_hw1(shape, size=None, default: bool = True) -> bool:
    """Is a 3-D map of shape [a, b, 1] one map [H, W, 1] (True) or a batch [B, H, W] of 1-px-wide maps
    (False, e.g. a ComfyUI MASK of a 1-px-wide image)? The shape alone cannot tell: `size`, the (H, W)
    of the image the map belongs to, decides when it fits one reading only; else `default` (True for
    channels-last arrays: numpy, PIL; False for torch tensors, whose 3-D layout is [B, H, W])."""
    if size is not None and _fits(shape[:2], size) != _fits(shape[1:], size):
        return _fits(shape[:2], size)
    return default


def is_channels_first(shape, size=None) -> bool:
    """Is a 4-D map [B, 1, a, b] channels-first [B, 1, H, W] (True) or [B, H, W, C] (False)? `size`
    decides when it fits one reading only; else channels-first unless the last dimension looks like
    channels (1, 3 or 4: ComfyUI's IMAGE/MASK layout of a 1-px-high image)."""
    if shape[1] != 1:
        return False
    if size is not None and _fits(shape[2:], size) != _fits(shape[1:3], size):
        return _fits(shape[2:], size)
    return shape[-1] not in (1, 3, 4)


def to_map_batch(x, name: str = "map", batch: int | None = None, size=None) -> torch.Tensor:
    """A single-channel map (depth, disparity, mask, defocus) -> float32 [B, H, W].

    Accepts [H,W], [B,H,W], [H,W,1] (numpy), [B,1,H,W] or [B,H,W,C] (the first channel is used); no
    value checks or clamping here (depth may legitimately hold any value). With `batch`, a single map
    is repeated to that batch size. A 3-D torch tensor is [B,H,W] (the core's and ComfyUI's layout), a
    3-D numpy array [a,b,1] is [H,W,1]; `size`, the (H, W) of the image the map belongs to, settles
    the cases where the shape fits only one of the readings (`is_single_map_hw1`, `is_channels_first`).
    """
    channels_last = not isinstance(x, torch.Tensor)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x).astype(np.float32))
    elif isinstance(x, torch.Tensor):
        t = x.float()
    else:
        try:
            if isinstance(x, Image.Image):
                t = torch.from_numpy(_pil_to_image_array(x).astype(np.float32))
                if t.ndim == 3:
                    t = t.mean(-1)
            else:
                t = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"{name}: cannot read {type(x).__name__} as a map ({e}).") from None
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3:
        t = t[None, ..., 0] if t.shape[-1] == 1 and is_single_map_hw1(t.shape, size, channels_last) else t
    elif t.ndim == 4:
        t = t[:, 0] if is_channels_first(t.shape, size) else t[..., 0]
    else:
        raise InputError(f"{name}: expected [H,W] or [B,H,W], got shape {tuple(t.shape)}.")
    if batch is not None and t.shape[0] != batch:
        if t.shape[0] == 1:
            t = t.expand(batch, -1, -1)
        else:
            raise InputError(f"{name}: batch of {t.shape[0]} does not match the image batch of {batch}.")
    return t.contiguous()


def fill_with_median(m: torch.Tensor, bad: torch.Tensor, all_bad_message: str) -> torch.Tensor:
    """Copy of maps m [B,H,W] with the `bad` pixels of each image set to the median of its other
    pixels; an image with no good pixel raises InputError(all_bad_message), "{b}" in it replaced by the
    image's index."""
    out = m.clone()
    for b in range(m.shape[0]):
        if bad[b].all():
            raise InputError(all_bad_message.replace("{b}", str(b)))
        if bad[b].any():
            out[b][bad[b]] = m[b][~bad[b]].median()
    return out


def resize_map(m: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """[B,H,W] -> [B,h,w] (bilinear, aligned corners off, as the reference resizes depth)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(m[:, None], size=size, mode=mode, **kw)[:, 0]


def bhwc_to_bchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def bchw_to_bhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def pad_to_multiple(x: torch.Tensor, multiple: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad [B,C,H,W] at the bottom/right to multiples of `multiple` (reflect where possible, else
    replicate) and return it with the original (H, W) for `crop`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if (ph < h and pw < w) else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo `pad_to_multiple`: keep the top-left `size` of [..., H, W]."""
    return x[..., : size[0], : size[1]]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,H,W,3] or [H,W,3] float in [0,1] -> uint8 numpy with rounding to nearest."""
    return (x.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


# Bytes per pixel a decoded file can take on its way to float32 RGB (decoded bands, a float copy,
# the clamped result): the estimate checked against free memory before decoding.
DECODE_BYTES_PER_PIXEL = 40


@contextlib.contextmanager
def open_image(path, what: str = "Image file"):
    """PIL image of a file, opened with its size checked before decoding: a header promising more
    pixels than PIL's decompression-bomb limit or more memory than is free is an InputError naming the
    size, as is any file PIL cannot read (also corrupt files on which PIL raises other errors)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file.")
    try:
        with Image.open(p) as im:
            w, h = im.size
            check_fits_in_memory(w * h * DECODE_BYTES_PER_PIXEL, f"{what} {path} ({w}x{h} px)")
            yield im
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} {path}: its header promises a huge image, refused before decoding "
                         f"(a decompression bomb or a corrupt header): {e}") from None
    except MemoryError:
        raise InputError(f"{what} {path} is too large for the memory of this machine.") from None
    except GenRefocusError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            ZeroDivisionError, struct.error) as e:  # what PIL's plugins raise on corrupt files
        raise InputError(f"Cannot read {what.lower()} {path}: {e or type(e).__name__}") from None


def load_image(path) -> torch.Tensor:
    """Read an image file -> [1, H, W, 3] float32 (EXIF orientation applied)."""
    from PIL import ImageOps

    with open_image(path) as im:
        return to_image_batch(ImageOps.exif_transpose(im), name=str(path))


def save_image(x: torch.Tensor, path) -> None:
    """Write [1,H,W,3] / [H,W,3] float in [0,1] as an 8-bit image (format by extension), atomically:
    a failed write leaves a previous file of that name intact."""
    arr = to_uint8(x[0] if x.ndim == 4 else x)
    save_pil_image(Image.fromarray(arr), path)
