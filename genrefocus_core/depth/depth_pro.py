"""Depth Pro (Bochkovskii et al., ICLR 2025) through transformers: metric depth and focal length.

Weights in either layout users have on disk (see docs/depth.md):
- a Hugging Face folder (`config.json` + `model.safetensors`, e.g. apple/DepthPro-hf), or
- Apple's `depth_pro.pt` (the file the GenRefocus release ships), read with `weights_only=True` and
  mapped onto transformers' names by `depth_pro_apple`; its architecture config ships with the pack
  (`configs/depth_pro_config.json`), so nothing is fetched from a hub.

Inference reproduces Apple's `DepthPro.infer` and transformers' image processor + post-processing:
the image is normalised to [-1, 1] and resized (bilinear, no antialias) to the square working
resolution (1536 px for the released model), the network predicts canonical inverse depth and the
horizontal field of view; inverse depth * (width / focal_px) is resized back to the input size and
inverted: depth = 1 / clamp(inverse_depth, 1e-4, 1e4) metres.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .depth_pro_apple import _apple_name_for, align_attention_names, check_state_dict, convert_apple_state_dict
from ..basics.errors import InputError, MissingModelFileError, ModelFileError
from ..basics.images import bhwc_to_bchw, to_image_batch

log = logging.getLogger(__name__)

SHIPPED_CONFIG = Path(__file__).resolve().parent / "configs" / "depth_pro_config.json"
APPLE_FILENAME = "depth_pro.pt"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
WEIGHTS_FOLDER = "models/depth_pro/ (in ComfyUI: ComfyUI/models/depth_pro/)"
# Depth Pro's output range in metres (Apple clamps inverse depth to [1e-4, 1e4]).
MIN_DEPTH_M, MAX_DEPTH_M = 1e-4, 1e4

@dataclass
class DepthResult:
    """Depth Pro's estimate for a batch.

    depth_m: metric depth [B, H, W] float32 in metres, at the input image's size.
    focal_px: focal length [B] in pixels of the input image's width (estimated, or the one given).
    fov_deg: horizontal field of view [B] in degrees matching focal_px.
    """

    depth_m: torch.Tensor
    focal_px: torch.Tensor
    fov_deg: torch.Tensor

    def disparity(self) -> torch.Tensor:
        """Disparity [B, H, W] in 1/m (bigger = nearer), the defocus map's input."""
        from ..basics.defocus import disparity_from_depth
        return disparity_from_depth(self.depth_m)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators (as Apple runs it), fp32 on CPU (half precision is slow there)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def working_size(config) -> int:
    """Side of the square the network runs at: the patch size over the smallest pyramid ratio."""
    return int(round(config.patch_size / min(config.scaled_images_ratios)))


# ----------------------------------------------------------------------------------------------
# Loading


def _transformers_depth_pro():
    """transformers' DepthPro classes, or a clear error on a transformers without them."""
    try:
        from transformers import DepthProConfig, DepthProForDepthEstimation
    except ImportError:
        import transformers
        raise ModelFileError(f"Depth Pro needs transformers >= 4.49 (installed: {transformers.__version__}); "
                             "install the pack's requirements: pip install -r requirements.txt") from None
    return DepthProConfig, DepthProForDepthEstimation


def _read_config(path: Path):
    DepthProConfig, _ = _transformers_depth_pro()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingModelFileError(path.name, path.parent, "It describes the Depth Pro architecture.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"Cannot read the Depth Pro config {path}: {e}") from None
    if not isinstance(data, dict) or data.get("model_type") != "depth_pro":
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise ModelFileError(f"{path} is not a Depth Pro config (model_type {found!r}, expected 'depth_pro').")
    try:
        return DepthProConfig.from_dict(data)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelFileError(f"Invalid Depth Pro config {path}: {e}") from None


def _build_on_meta(config):
    """The model skeleton without memory for weights (filled by `load_state_dict(assign=True)`)."""
    _, DepthProForDepthEstimation = _transformers_depth_pro()
    with torch.device("meta"):
        model = DepthProForDepthEstimation(config)
    return model


def _torch_load(path: Path) -> dict:
    """A `.pt` file through the safe unpickler only; every failure becomes a ModelFileError."""
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) torch.save format cannot be memory-mapped
                raise
            obj = load(mmap=False)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "weights_only" in msg:
            raise ModelFileError(
                f"{path} was refused: it is a pickle that asks to run code or build objects other than tensors, "
                "so it is not a plain weights file (never load such a file with weights_only=False). "
                "Use the released depth_pro.pt.") from None
        reason = msg.splitlines()[0] if msg else "unpickling failed"
        raise ModelFileError(f"{path} is not a PyTorch checkpoint ({reason}).") from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as e:
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise ModelFileError(f"{path} is not a readable PyTorch checkpoint, or it is truncated/corrupt "
                             f"(re-download it): {first}") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model") \
            and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))  # a state dict saved inside a one-key wrapper
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise ModelFileError(f"{path} does not hold a state dict of named tensors (found {type(obj).__name__}).")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise MissingModelFileError(path.name, path.parent) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file, or it is truncated/corrupt: {e}") from None


def _load_hf_weights(folder: Path) -> dict:
    single = folder / HF_WEIGHTS
    if single.is_file():
        return _load_safetensors(single)
    index = folder / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"Cannot read the shard index {index}: {e}") from None
        state = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise MissingModelFileError(shard, folder, f"It is listed in {HF_INDEX}.")
            state.update(_load_safetensors(folder / shard))
        return state
    raise MissingModelFileError(HF_WEIGHTS, folder, "The Hugging Face layout needs config.json and model.safetensors "
                                f"there (or put Apple's {APPLE_FILENAME} in {WEIGHTS_FOLDER}).")


def _is_apple_layout(state: dict) -> bool:
    return any(k.startswith(("encoder.patch_encoder.", "decoder.fusions.")) for k in state)


def _resolve(path) -> tuple[str, Path, Path | None]:
    """-> (layout 'hf' | 'apple' | 'file', weights path, config path or None)."""
    if path is None or str(path).strip() == "":
        raise MissingModelFileError(APPLE_FILENAME, WEIGHTS_FOLDER,
                                    "Or give the Hugging Face folder (config.json + model.safetensors).")
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file() and ((p / HF_WEIGHTS).is_file() or (p / HF_INDEX).is_file()):
            return "hf", p, p / "config.json"
        if (p / APPLE_FILENAME).is_file():
            return "apple", p / APPLE_FILENAME, None
        raise MissingModelFileError(APPLE_FILENAME, p, "Or put the Hugging Face layout there "
                                    "(config.json + model.safetensors).")
    if not p.exists():
        raise MissingModelFileError(p.name, p.parent if str(p.parent) not in ("", ".") else WEIGHTS_FOLDER,
                                    f"Depth Pro weights belong in {WEIGHTS_FOLDER}: Apple's {APPLE_FILENAME} "
                                    "or the Hugging Face folder (config.json + model.safetensors).")
    config = p.parent / "config.json" if p.suffix == ".safetensors" and (p.parent / "config.json").is_file() else None
    return "file", p, config


def _config_from(config, fallback: Path):
    """None -> the config file `fallback`; a path -> that config.json; a dict or DepthProConfig as is."""
    if config is None:
        return _read_config(fallback)
    if isinstance(config, (str, Path)):
        return _read_config(Path(config))
    if isinstance(config, dict):
        return _transformers_depth_pro()[0].from_dict(config)
    if getattr(config, "model_type", None) == "depth_pro":
        return config
    raise InputError("config: expected a path to config.json, a dict or a DepthProConfig, "
                     f"got {type(config).__name__}.")


def _checked_state(path, config) -> tuple[dict, torch.nn.Module, str, bool]:
    """Read weights from `path` in either layout -> (state dict in the installed transformers'
    names, checked against the architecture; the model built on the meta device; source path;
    Apple layout?)."""
    layout, weights_path, config_path = _resolve(path)
    if layout == "hf":
        state = _load_hf_weights(weights_path)
    elif weights_path.suffix == ".safetensors":
        state = _load_safetensors(weights_path)
    else:
        state = _torch_load(weights_path)
    source = str(weights_path)
    apple = _is_apple_layout(state)
    if apple or config_path is None:
        config = _config_from(config, SHIPPED_CONFIG)
    else:
        config = _read_config(config_path)
    skeleton = _build_on_meta(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if apple:
        state = convert_apple_state_dict(state, expected, source=source)
    else:
        if not any(k.startswith(("depth_pro.", "fusion_stage.", "fov_model.")) for k in state):
            raise ModelFileError(f"{source} is not a Depth Pro checkpoint (no Depth Pro tensors among "
                                 f"{len(state)}: e.g. {sorted(state)[:3]}).")
        state = align_attention_names(state, expected)
        check_state_dict(state, expected, source)
    return state, skeleton, source, apple


def _write_hf_folder(state: dict, config, out: Path, source_name: str) -> Path:
    """config.json + model.safetensors, written to a temporary folder first and renamed into place
    (a failed write removes the temporary folder and leaves any previous copy as it was)."""
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        # the split q/k/v are views of one fused tensor: safetensors needs them as separate storages
        tensors = {k: v.clone() if v._base is not None else v.contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / HF_WEIGHTS),
                  metadata={"format": "pt", "converted_from": source_name})
        config.to_json_file(str(tmp / "config.json"))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _cache_folder(path, cache_dir, config) -> Path | None:
    """Where the converted copy of an Apple-layout file lives: keyed by the file's path, size and
    modification time and by the architecture, so a changed file is converted again."""
    _, weights_path, _ = _resolve(path)
    if weights_path.is_dir():
        return None
    stat = weights_path.stat()
    arch = _config_from(config, SHIPPED_CONFIG).to_json_string()
    tag = hashlib.sha1(f"{weights_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{arch}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{weights_path.stem}-{tag}"


def load_depth_pro(path, device=None, dtype=None, config=None, cache_dir=None):
    """Load Depth Pro from a Hugging Face folder, Apple's `depth_pro.pt`, or a single weights file.

    path: a folder holding `config.json` + `model.safetensors` (or its shards), a folder holding
      `depth_pro.pt`, or a weights file (`.pt`/`.pth`/`.bin` read with weights_only=True, or
      `.safetensors`) in either key layout; Apple-layout files use the shipped full-size config.
    device / dtype: default CUDA (or MPS) with fp16 when available, else CPU with fp32.
    config: the architecture for Apple-layout files and lone weight files (a config.json path, dict or
      DepthProConfig); default the shipped full-size Depth Pro config (a HF folder uses its own).
    cache_dir: optional folder where an Apple-layout file is kept, once converted, as a Hugging Face
      folder (safetensors); later loads read that copy instead of unpickling the file again.
    Returns transformers' DepthProForDepthEstimation in eval mode without gradients.
    Raises MissingModelFileError (names the file and `models/depth_pro/`) or ModelFileError (not a
    checkpoint, truncated, code in the pickle, unknown/missing tensors, wrong shapes).
    """
    cached = _cache_folder(path, cache_dir, config) if cache_dir is not None else None
    if cached is not None and (cached / HF_WEIGHTS).is_file() and (cached / "config.json").is_file():
        log.info("Depth Pro: using the converted copy %s of %s.", cached, path)
        return load_depth_pro(cached, device=device, dtype=dtype)
    state, model, source, apple = _checked_state(path, config)
    if apple and cached is not None:
        try:
            _write_hf_folder(state, model.config, cached, Path(source).name)
        except OSError as e:  # no room or no permission for the cache: only the next load is slower
            log.warning("Could not cache the converted Depth Pro weights in %s (%s); converting again next time.",
                        cached, e)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    model.genrefocus_source = source
    log.info("Loaded Depth Pro from %s (%s layout) on %s as %s.", source, "Apple" if apple else "Hugging Face",
             device, dtype)
    return model


def convert_apple_checkpoint(apple_path, out_dir, config=None) -> Path:
    """Write Apple's `depth_pro.pt` once as a Hugging Face folder (config.json + model.safetensors)
    that loads without unpickling; the tensors keep the file's dtype. Returns the folder."""
    state, skeleton, source, apple = _checked_state(apple_path, config)
    if not apple:
        raise ModelFileError(f"{source} is not in Apple's depth_pro.pt layout (it needs no conversion).")
    return _write_hf_folder(state, skeleton.config, Path(out_dir), Path(source).name)


def release_depth_pro(model, offload_to_cpu: bool = False) -> None:
    """Free the depth model's accelerator memory before FLUX runs.

    offload_to_cpu=True keeps the weights in CPU RAM for a later `model.to(device)`; otherwise the
    weights are dropped (the model is then unusable and `estimate_depth` says so).
    """
    if offload_to_cpu:
        model.to("cpu")
    else:
        model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


@contextmanager
def depth_pro_loaded(path, device=None, dtype=None, config=None) -> Iterator:
    """`with depth_pro_loaded(path) as model:` loads Depth Pro and releases it on exit."""
    model = load_depth_pro(path, device=device, dtype=dtype, config=config)
    try:
        yield model
    finally:
        release_depth_pro(model)


# ----------------------------------------------------------------------------------------------
# Inference


def _focal_override(focal_px, batch: int) -> torch.Tensor | None:
    if focal_px is None:
        return None
    f = torch.as_tensor(focal_px, dtype=torch.float32).flatten().cpu()
    if f.numel() not in (1, batch):
        raise InputError(f"focal_px: expected one value or one per image ({batch}), got {f.numel()}.")
    if not (torch.isfinite(f).all() and (f > 0).all()):
        raise InputError(f"focal_px must be positive pixel counts, got {focal_px}.")
    return f.expand(batch).clone()


@torch.no_grad()
def estimate_depth(model, image, focal_px=None, max_batch: int = 1, callback=None) -> DepthResult:
    """Metric depth of `image` ([B, H, W, 3] float in [0, 1], or anything `to_image_batch` takes).

    Any size and aspect ratio: the network sees the image squeezed to its square working resolution
    and the depth is resized back to (H, W), as Apple's and transformers' pipelines do.
    focal_px: optional known focal length in pixels (e.g. from EXIF), one value or one per image;
      it replaces the estimated one in the metric scale (Apple's `f_px`).
    max_batch: images per forward pass (each image is 37 ViT-L passes of 384 px; 1 keeps memory low).
    callback: optional callback(done_images, total_images) after each pass; it may raise to cancel.
    Returns a DepthResult on the input's device, float32.
    """
    images = to_image_batch(image)
    out_device = images.device
    batch, height, width, _ = images.shape
    try:
        param = next(model.parameters())
    except (StopIteration, AttributeError):
        raise InputError("estimate_depth needs a Depth Pro model from load_depth_pro.") from None
    if param.is_meta:
        raise InputError("This Depth Pro model was released (release_depth_pro); load it again with load_depth_pro.")
    device, dtype = param.device, param.dtype
    focal_given = _focal_override(focal_px, batch)
    if focal_given is None and getattr(model, "fov_model", None) is None:
        raise InputError("This Depth Pro model has no field-of-view head: give focal_px (the focal length in pixels).")
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}.")
    size = working_size(model.config)

    depths, focals, fovs = [], [], []
    for start in range(0, batch, max_batch):
        chunk = bhwc_to_bchw(images[start:start + max_batch]).to(device=device, dtype=torch.float32)
        pixels = chunk * 2.0 - 1.0  # normalise with mean 0.5, std 0.5
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        output = model(pixel_values=pixels.to(dtype))
        canonical_inverse_depth = output.predicted_depth.float()  # [b, size, size]
        if focal_given is not None:
            focal = focal_given[start:start + max_batch].to(device)
            fov = torch.rad2deg(2.0 * torch.atan(0.5 * width / focal))
        else:
            fov = output.field_of_view.float().reshape(-1)  # [b] degrees, horizontal
            focal = 0.5 * width / torch.tan(0.5 * torch.deg2rad(fov))
            if not (torch.isfinite(focal).all() and (focal > 0).all()):
                raise ModelFileError(f"Depth Pro predicted an impossible field of view ({fov.tolist()} degrees): "
                                     "the weights are probably not Depth Pro's. Give focal_px to override.")
        inverse_depth = canonical_inverse_depth * (width / focal)[:, None, None]
        inverse_depth = F.interpolate(inverse_depth[:, None], size=(height, width), mode="bilinear",
                                      align_corners=False)[:, 0]
        depth = 1.0 / inverse_depth.clamp(min=1.0 / MAX_DEPTH_M, max=1.0 / MIN_DEPTH_M)
        depths.append(depth.to(out_device))
        focals.append(focal.to(out_device))
        fovs.append(fov.to(out_device))
        if callback is not None:
            callback(min(start + max_batch, batch), batch)
    return DepthResult(depth_m=torch.cat(depths), focal_px=torch.cat(focals), fov_deg=torch.cat(fovs))


def estimate_depth_from_file(path, image, device=None, dtype=None, focal_px: float | Sequence[float] | None = None,
                             max_batch: int = 1, config=None, callback=None) -> DepthResult:
    """Load Depth Pro, estimate the depth of `image`, release the model (one-shot use, e.g. the CLI)."""
    with depth_pro_loaded(path, device=device, dtype=dtype, config=config) as model:
        return estimate_depth(model, image, focal_px=focal_px, max_batch=max_batch, callback=callback)


def fov_to_focal_px(fov_deg: float, width_px: int) -> float:
    """Horizontal field of view in degrees -> focal length in pixels for an image `width_px` wide."""
    if not (0.0 < fov_deg < 180.0) or width_px <= 0:
        raise InputError("Field of view must lie in (0, 180) degrees and the width be positive, "
                         f"got {fov_deg}, {width_px}.")
    return 0.5 * width_px / math.tan(math.radians(fov_deg) / 2.0)
