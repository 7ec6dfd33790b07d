"""Where each model file the shipped workflows name comes from, and which ComfyUI folder it goes in.

Two readers: `tools/workflow_models.py` writes these entries into the workflows as `properties.models`
(the front end's missing-models dialog lists name, folder and download link from them), and the loader
nodes put the link into their "file missing" message. Directories are ComfyUI folder names (the keys
of folder_paths), not paths. No ComfyUI imports.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from genrefocus_core.generative.stages import ADAPTERS

_HF = "https://huggingface.co"
_GENFOCUS = f"{_HF}/nycu-cplab/Genfocus-Model/resolve/main"
_ENCODERS = f"{_HF}/comfyanonymous/flux_text_encoders/resolve/main"
# Extensions of files a model picker lists; a workflow widget value ending in one names a model file.
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass(frozen=True)
class ModelFile:
    name: str       # file name as the pickers list it
    url: str        # direct download link
    directory: str  # ComfyUI folder name

    def metadata(self) -> dict:
        """The entry the front end reads from a node's `properties.models`."""
        return asdict(self)


MODEL_FILES = {m.name: m for m in [
    ModelFile("flux1-dev.safetensors", f"{_HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
              "diffusion_models"),
    ModelFile("ae.safetensors", f"{_HF}/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors", "vae"),
    ModelFile("clip_l.safetensors", f"{_ENCODERS}/clip_l.safetensors", "text_encoders"),
    ModelFile("t5xxl_fp16.safetensors", f"{_ENCODERS}/t5xxl_fp16.safetensors", "text_encoders"),
    ModelFile("t5xxl_fp8_e4m3fn.safetensors", f"{_ENCODERS}/t5xxl_fp8_e4m3fn.safetensors", "text_encoders"),
    # Apple's checkpoint as the GenRefocus release uses it (a .pt file: the dialog shows it without a
    # download button, which it offers for .safetensors only)
    ModelFile("depth_pro.pt", f"{_HF}/apple/DepthPro/resolve/main/depth_pro.pt", "depth_pro"),
    *[ModelFile(a.file, f"{_GENFOCUS}/{a.file}", "genrefocus") for a in ADAPTERS.values() if a.released],
]}


def looks_like_model_file(value) -> bool:
    return isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES)


def download_hint(name: str) -> str:
    """' Download: <url>' for a known file, '' otherwise (for error messages)."""
    known = MODEL_FILES.get(name)
    return f" Download: {known.url}" if known else ""
