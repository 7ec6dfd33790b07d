"""The tiny FLUX for ComfyUI's own loaders, in a test server's base directory.

`install_native_flux(base, tiny_dir)` writes the shared tiny weights as the files a ComfyUI user has
(names in NATIVE_FILES, under base/models), links the test-only node `tiny_flux_support` (shape-derived
detection of the tiny FLUX and VAE, stored prompt embeddings as CONDITIONING) into base/custom_nodes,
and, when COMFYUI_GGUF_DIR names a ComfyUI-GGUF checkout, links that too and writes the GGUF files.
It returns the environment the server needs (GENREFOCUS_TINY_DIR).
"""
from __future__ import annotations

import os
from pathlib import Path

import flux_files

GGUF_DIR_ENV = "COMFYUI_GGUF_DIR"
GGUF_PACK_NAME = "ComfyUI-GGUF"
SUPPORT_NODE = Path(__file__).resolve().parent / "tiny_flux_support"
SUPPORT_NODE_NAME = "genrefocus-test-tiny-flux"
PARITY_NODE = Path(__file__).resolve().parent / "native_parity_node"  # test-only: parity cases in the server
GGUF_TESTED_QTYPES = ("Q8_0", "Q4_0")

# models/<folder>/<name>: the ComfyUI loaders' widget values
NATIVE_FILES = {
    "unet": "diffusion_models/genrefocus-tiny-flux.safetensors",  # BFL layout, fp32 (UNETLoader)
    "checkpoint": "checkpoints/genrefocus-tiny-flux-checkpoint.safetensors",  # transformer + VAE, no text encoders
    "vae": "vae/genrefocus-tiny-ae.safetensors",  # LDM layout (VAELoader)
}
GGUF_FILES = {q: f"diffusion_models/genrefocus-tiny-flux-{q}.gguf" for q in GGUF_TESTED_QTYPES}  # UnetLoaderGGUF


def widget_name(rel: str) -> str:
    """models/<folder>/<name> -> the name a loader node takes."""
    return rel.split("/", 1)[1]


def comfyui_gguf_dir() -> Path | None:
    d = os.environ.get(GGUF_DIR_ENV)
    return Path(d).expanduser() if d else None


def gguf_missing_reason() -> str | None:
    d = comfyui_gguf_dir()
    if d is None:
        return (f"{GGUF_DIR_ENV} is not set (it names a ComfyUI-GGUF checkout, github.com/city96/ComfyUI-GGUF; "
                "its `gguf` requirement must be installed in COMFYUI_PYTHON)")
    if not (d / "nodes.py").is_file():
        return f"{GGUF_DIR_ENV}={d} has no nodes.py: not a ComfyUI-GGUF checkout"
    return None


def install_native_flux(base: Path, tiny_dir: Path) -> dict:
    models = base / "models"
    os.symlink(SUPPORT_NODE, base / "custom_nodes" / SUPPORT_NODE_NAME)
    os.symlink(PARITY_NODE, base / "custom_nodes" / "genrefocus-test-native-parity")
    flux_files.write_bfl_transformer(tiny_dir, models / NATIVE_FILES["unet"])
    flux_files.write_checkpoint(tiny_dir, models / NATIVE_FILES["checkpoint"])
    flux_files.write_ldm_vae(tiny_dir, models / NATIVE_FILES["vae"])
    if gguf_missing_reason() is None:
        os.symlink(comfyui_gguf_dir(), base / "custom_nodes" / GGUF_PACK_NAME)
        for qtype, rel in GGUF_FILES.items():
            flux_files.write_gguf_transformer(tiny_dir, models / rel, qtype)
    return {"GENREFOCUS_TINY_DIR": str(tiny_dir)}


# The ways a ComfyUI user loads FLUX, each on the tiny files: UNETLoader in two weight dtypes, a checkpoint,
# ComfyUI-GGUF's loader per tested quantisation.
LOADER_KINDS = ("unet", "unet-fp8_e4m3fn", "checkpoint") + tuple(f"gguf-{q}" for q in GGUF_TESTED_QTYPES)


def native_loader_nodes(kind: str, first_id: int = 101) -> tuple[dict, list, list]:
    """API-format loader nodes for `kind` (LOADER_KINDS) -> (nodes, MODEL output, VAE output); the VAE comes
    from the checkpoint for "checkpoint", else from VAELoader with the LDM-layout tiny VAE."""
    a, b = str(first_id), str(first_id + 1)
    vae_loader = {b: {"class_type": "VAELoader", "inputs": {"vae_name": widget_name(NATIVE_FILES["vae"])}}}
    if kind == "checkpoint":
        return ({a: {"class_type": "CheckpointLoaderSimple",
                     "inputs": {"ckpt_name": widget_name(NATIVE_FILES["checkpoint"])}}}, [a, 0], [a, 2])
    if kind.startswith("gguf-"):
        node = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": widget_name(GGUF_FILES[kind[5:]])}}
    elif kind.startswith("unet"):
        dtype = kind[5:] or "default"
        node = {"class_type": "UNETLoader", "inputs": {"unet_name": widget_name(NATIVE_FILES["unet"]),
                                                        "weight_dtype": dtype}}
    else:
        raise ValueError(f"unknown loader kind {kind!r}; one of {LOADER_KINDS}")
    return {a: node, **vae_loader}, [a, 0], [b, 0]
