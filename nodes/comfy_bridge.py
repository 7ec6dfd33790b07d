"""The only module of the pack that touches ComfyUI.

Everything ComfyUI offers (model folders, device and memory management, the progress bar, the
interrupt flag) is reached through these functions. ComfyUI's modules are imported lazily and
optionally, so the node modules import and run without ComfyUI (unit tests, other front ends); there
the functions fall back to plain behaviour: folders from GENREFOCUS_MODELS_DIR, the CPU (or CUDA if
present), no progress bar, no interrupt.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path

from genrefocus_core.basics.errors import MissingModelFileError
from genrefocus_core.basics.files import save_pil_image

from .model_catalog import download_hint

log = logging.getLogger("GenRefocus")

# Our own model folders (name used with folder_paths -> sub-folder of ComfyUI's models dir).
PACK_MODEL_FOLDERS = {
    "genrefocus": "genrefocus",   # DeblurNet / BokehNet LoRA files (and the optional prompt cache)
    "depth_pro": "depth_pro",     # Depth Pro: Apple's depth_pro.pt or a transformers folder
}
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth"}
# ComfyUI's own folders we read from, with the sub-folder users know them by.
COMFY_FOLDER_HINTS = {
    "diffusion_models": "models/diffusion_models (or models/unet)",
    "vae": "models/vae",
    "text_encoders": "models/text_encoders (or models/clip)",
    "genrefocus": "models/genrefocus",
    "depth_pro": "models/depth_pro",
}


def _optional(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def folder_paths():
    """ComfyUI's folder_paths module, or None outside ComfyUI."""
    return _optional("folder_paths")


def model_management():
    """comfy.model_management, or None outside ComfyUI."""
    return _optional("comfy.model_management")


def in_comfyui() -> bool:
    return folder_paths() is not None and model_management() is not None


# ------------------------------------------------------------------ model folders
def _fallback_models_dir() -> Path | None:
    d = os.environ.get("GENREFOCUS_MODELS_DIR")
    return Path(d) if d else None


def register_model_folders() -> None:
    """Add models/genrefocus and models/depth_pro to ComfyUI's folder registry (idempotent).

    Paths already configured (extra_model_paths.yaml) are kept; the default folder is appended.
    """
    fp = folder_paths()
    if fp is None:
        return
    for name, sub in PACK_MODEL_FOLDERS.items():
        default = os.path.join(fp.models_dir, sub)
        if name in fp.folder_names_and_paths:
            paths, exts = fp.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            fp.folder_names_and_paths[name] = (paths, set(exts) | MODEL_EXTENSIONS)
        else:
            fp.folder_names_and_paths[name] = ([default], set(MODEL_EXTENSIONS))
        os.makedirs(default, exist_ok=True)


def folder_hint(folder: str) -> str:
    """Where a user puts files of `folder`: ComfyUI's real paths when known."""
    fp = folder_paths()
    if fp is not None:
        with contextlib.suppress(KeyError):
            return " or ".join(fp.get_folder_paths(folder))
    base = _fallback_models_dir()
    if base is not None:
        return str(base / folder)
    return "ComfyUI/" + COMFY_FOLDER_HINTS.get(folder, "models/" + folder)


def list_models(folder: str) -> list[str]:
    """File names (relative to the folder) for a model picker; [] when the folder is empty or unknown."""
    fp = folder_paths()
    if fp is not None:
        try:
            return list(fp.get_filename_list(folder))
        except KeyError:
            return []
    base = _fallback_models_dir()
    if base is None or not (base / folder).is_dir():
        return []
    root = base / folder
    out = []
    for dirpath, _, files in os.walk(root, followlinks=True):  # as ComfyUI: symlinked folders count
        for f in files:
            if os.path.splitext(f)[1].lower() in MODEL_EXTENSIONS:
                out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def _find_model(folder: str, filename: str) -> str | None:
    fp = folder_paths()
    if fp is not None:
        try:
            return fp.get_full_path(folder, filename)
        except KeyError:
            return None
    base = _fallback_models_dir()
    if base is not None and (base / folder / filename).is_file():
        return str(base / folder / filename)
    return None


def model_path(folder: str, filename: str) -> str:
    """Full path of `filename` in model folder `folder`; MissingModelFileError naming both otherwise."""
    if not filename:
        raise MissingModelFileError("(none selected)", folder_hint(folder),
                                    "Choose a file in the node's model picker (refresh the page after adding files).")
    full = _find_model(folder, filename)
    if full is None:
        raise MissingModelFileError(filename, folder_hint(folder), download_hint(filename).strip())
    return full


def require_model_files(choices: list[tuple[str, str]], none: str = "none") -> None:
    """Check every (folder, file name) a node was given before loading anything: one error naming each
    missing file, its folder and (for the released files) where to download it.

    The loader nodes accept any name at validation (their VALIDATE_INPUTS), so that a workflow naming
    files that are not installed yet reaches this message instead of ComfyUI's "Value not in list"."""
    missing = [(folder, name) for folder, name in choices if name and name != none and _find_model(folder, name) is None]
    if not missing:
        return
    if len(missing) == 1:
        folder, name = missing[0]
        raise MissingModelFileError(name, folder_hint(folder), download_hint(name).strip())
    err = MissingModelFileError(", ".join(n for _, n in missing), "; ".join(folder_hint(f) for f, _ in missing))
    err.args = ("Model files not found: " + " ".join(
        f"'{n}': put it in {folder_hint(f)}.{download_hint(n)}" for f, n in missing),)
    raise err


# ------------------------------------------------------------------ devices and memory
def torch_device():
    """The device ComfyUI computes on (its --cpu/--gpu-only flags respected)."""
    mm = model_management()
    if mm is not None:
        return mm.get_torch_device()
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device():
    """Where models rest between runs (ComfyUI's choice: CPU unless --gpu-only / --highvram)."""
    mm = model_management()
    if mm is not None:
        return mm.unet_offload_device()
    import torch
    return torch.device("cpu")


def free_memory(bytes_needed: float | None = None) -> None:
    """Make room before loading or running a big model: ComfyUI unloads its own models
    (all of them when bytes_needed is None) and empties the allocator cache."""
    mm = model_management()
    if mm is None:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    if bytes_needed is None:
        mm.unload_all_models()
    else:
        mm.free_memory(float(bytes_needed), mm.get_torch_device())
    mm.soft_empty_cache()


def soft_empty_cache() -> None:
    mm = model_management()
    if mm is not None:
        mm.soft_empty_cache()
    else:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    mm = model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class StepProgress:
    """Per-step callback for the core samplers: advances ComfyUI's progress bar and stops between
    steps when the user cancels. Call signature matches the core: callback(step, total, latents)."""

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self.calls = 0
        utils = _optional("comfy.utils")
        self._bar = utils.ProgressBar(self.total) if utils is not None else None

    def __call__(self, step: int, total: int, latents=None) -> None:
        self.calls += 1
        if self._bar is not None:
            self._bar.update_absolute(min(int(step), int(total)), int(total))
        throw_if_interrupted()


# ------------------------------------------------------------------ preview files
def save_preview_images(images, prefix: str = "genrefocus") -> list[dict]:
    """Save [B,H,W,3] float images into ComfyUI's temp folder for a node's UI preview; returns the
    `ui.images` entries ([] outside ComfyUI)."""
    fp = folder_paths()
    if fp is None:
        return []
    import numpy as np
    from PIL import Image
    temp = fp.get_temp_directory()
    os.makedirs(temp, exist_ok=True)
    out = []
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    full_folder, filename, counter, subfolder, _ = fp.get_save_image_path(prefix, temp, arr.shape[2], arr.shape[1])
    for b in range(arr.shape[0]):
        name = f"{filename}_{counter:05}_.png"
        save_pil_image(Image.fromarray(arr[b]), os.path.join(full_folder, name), "preview", compress_level=1)
        out.append({"filename": name, "subfolder": subfolder, "type": "temp"})
        counter += 1
    return out


def input_directory() -> str | None:
    fp = folder_paths()
    return fp.get_input_directory() if fp is not None else None


def model_patcher_type():
    """ComfyUI's ModelPatcher class (to hand extra weights to its memory manager), or None outside ComfyUI."""
    module = _optional("comfy.model_patcher")
    return getattr(module, "ModelPatcher", None) if module is not None else None


def attention_function(device):
    """ComfyUI's attention (its choice of sage, flash, xformers or PyTorch attention, per its flags) as
    f(q, k, v) [N, H, S, D] -> [N, S, H*D], for GPUs; None on the CPU or outside ComfyUI (the core then uses
    torch's SDPA, which on the CPU is faster than ComfyUI's CPU fallbacks)."""
    import torch
    module = _optional("comfy.ldm.modules.attention")
    if module is None or torch.device(device).type == "cpu":
        return None
    return lambda q, k, v: module.optimized_attention(q, k, v, q.shape[1], skip_reshape=True)
