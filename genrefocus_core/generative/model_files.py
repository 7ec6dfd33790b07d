"""Finding model files and telling what they hold before anything large is read.

A safetensors file starts with an 8-byte little-endian header length and a JSON header listing
every tensor's dtype, shape and byte range. Reading only that header is enough to reject a file
that is not safetensors, is truncated, or belongs to another model family, with a message that
names the file, what it looks like, and where the right file goes.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..basics.errors import MissingModelFileError, ModelFileError
from .stages import ADAPTERS

# Where each kind of file lives in a ComfyUI install (used in messages and by the node layer).
COMFYUI_FOLDERS = {
    "transformer": "ComfyUI/models/diffusion_models/ (older installs: ComfyUI/models/unet/)",
    "vae": "ComfyUI/models/vae/",
    "clip_l": "ComfyUI/models/text_encoders/ (older installs: ComfyUI/models/clip/)",
    "t5": "ComfyUI/models/text_encoders/ (older installs: ComfyUI/models/clip/)",
    "lora": "ComfyUI/models/genrefocus/",
    "depth": "ComfyUI/models/genrefocus/ (Depth Pro)",
    "diffusers": "a local folder in the diffusers layout (model_index.json, transformer/, vae/, ...)",
}

# What a user normally calls each file, for messages.
TYPICAL_NAMES = {
    "transformer": "flux1-dev.safetensors (or flux1-dev-fp8*.safetensors)",
    "vae": "ae.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5": "t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)",
    "lora": " / ".join(a.file for a in ADAPTERS.values() if a.released),
}

_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def file_stamp(path):
    """(resolved path, size, mtime, inode) of a file, or None if there is none: a changed stamp means
    another file (the inode catches a file replaced by rename within one clock tick)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino


@dataclass
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "BF16", "F8_E4M3"
    shape: tuple


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict  # key -> TensorInfo
    metadata: dict = field(default_factory=dict)

    def keys(self):
        return self.tensors.keys()

    def shape(self, key):
        return self.tensors[key].shape

    def dtypes(self) -> set:
        return {t.dtype for t in self.tensors.values()}


def require_file(path, kind: str) -> Path:
    """The path as a Path if it is an existing file, else MissingModelFileError naming the ComfyUI folder."""
    if path is None or str(path) == "":
        raise MissingModelFileError(TYPICAL_NAMES.get(kind, kind), COMFYUI_FOLDERS.get(kind, "its model folder"),
                                    "No path was given.")
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ModelFileError(f"{p} is a folder, a single {kind} file was expected "
                             f"(typically {TYPICAL_NAMES.get(kind, kind)}).")
    where = COMFYUI_FOLDERS.get(kind, "its model folder")
    hint = f"(looked for {p}; the parent folder {'exists' if p.parent.is_dir() else 'does not exist either'})"
    raise MissingModelFileError(p.name, where, hint)


def require_diffusers_component(root, subfolder: str, kind: str) -> Path:
    """`root/subfolder` when root is a diffusers pipeline folder, or root itself when it is that component."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingModelFileError(root.name, COMFYUI_FOLDERS["diffusers"], f"(looked for folder {root})")
    for candidate in (root / subfolder, root):
        if (candidate / "config.json").is_file() or (candidate / "scheduler_config.json").is_file():
            if subfolder.startswith("tokenizer"):
                continue
            check_component_folder(candidate, kind)
            return candidate
        if subfolder.startswith("tokenizer") and (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise MissingModelFileError(f"{subfolder}/config.json", root,
                                f"{root} is not a diffusers folder with a '{subfolder}' component ({kind}).")


# Weight files that are Python pickles: opening one can run code, so they are never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def read_json_config(path) -> dict:
    """A model config file as a dict; ModelFileError naming the file when it is not a JSON object."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a readable JSON config ({e}); the folder is damaged, download it "
                             "again.") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: not a model config (a JSON object was expected, got {type(config).__name__}).")
    return config


def check_component_folder(folder, kind: str) -> None:
    """A diffusers component folder (transformer/, vae/, text_encoder/...), checked before diffusers or
    transformers read it: config.json is a JSON object, the weights are safetensors files whose headers
    are intact and whose data is complete (a truncated download is named), sharded weights have all
    their shards; pickle weights (.bin, .pt, ...) are refused, never opened."""
    folder = Path(folder)
    read_json_config(folder / "config.json")
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not weights:
        if pickles:
            raise ModelFileError(f"{folder}: the {kind} weights are pickle files ({', '.join(pickles)}), which can run "
                                 "code when opened and are never loaded. Use the .safetensors files of this model "
                                 "(FLUX.1-dev's diffusers folder ships them).")
        raise MissingModelFileError("*.safetensors", folder, f"The {kind} folder has a config.json but no weights.")
    for index in folder.glob("*.safetensors.index.json"):
        shards = set(read_json_config(index).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise MissingModelFileError(missing[0], folder, f"{index.name} lists {len(missing)} shard(s) that are "
                                        "not there; the download is incomplete.")
    for w in weights:
        read_safetensors_header(w)


def read_safetensors_header(path) -> SafetensorsHeader:
    """Parse the header only; raise ModelFileError for non-safetensors, truncated or malformed files."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: file is empty or far too short ({size} bytes) to be a safetensors file.")
        kind = _sniff_other_format(head)
        if kind:
            raise ModelFileError(f"{path}: this is {kind}, not a safetensors file. Only .safetensors files are "
                                 "loaded (pickled checkpoints can run code when opened).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 1 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise ModelFileError(f"{path}: not a safetensors file (or truncated): header length {header_len} "
                                 f"does not fit a file of {size} bytes.")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: corrupt safetensors header ({e}).") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    data_end = 0
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: corrupt safetensors header entry for '{key}'.") from None
        n = 1
        for s in shape:
            n *= int(s)
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and end - start != n * width:
            raise ModelFileError(f"{path}: corrupt safetensors header: '{key}' has {end - start} bytes for "
                                 f"shape {list(shape)} of {dtype}.")
        tensors[key] = TensorInfo(dtype, shape)
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        missing = 8 + header_len + data_end - size
        raise ModelFileError(f"{path}: truncated file: {missing} bytes of tensor data are missing "
                             f"(file has {size} bytes, header promises {8 + header_len + data_end}). "
                             "Download it again.")
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata)


def _sniff_other_format(head: bytes) -> str:
    if head[:2] == b"PK":
        return "a zip archive (a PyTorch .pt/.ckpt pickle checkpoint)"
    if head[:1] == b"\x80":
        return "a Python pickle (a legacy PyTorch checkpoint)"
    if head[:4] == b"GGUF":
        return "a GGUF file (quantised for ComfyUI-GGUF; load the .safetensors model instead)"
    if head.lstrip()[:1] == b"<":
        return "a text/HTML file (probably an error page saved instead of the download)"
    return ""


# ---------------------------------------------------------------------------------------------
# Families: what a state dict is, from its keys alone.

FLUX_BFL = "FLUX transformer (original Black Forest Labs key layout)"
FLUX_DIFFUSERS = "FLUX transformer (diffusers key layout)"
FLUX_VAE_LDM = "FLUX/SD autoencoder (original key layout, e.g. ae.safetensors)"
FLUX_VAE_DIFFUSERS = "autoencoder (diffusers key layout)"
CLIP_TEXT = "CLIP text encoder"
T5_ENCODER = "T5 text encoder"
LORA = "LoRA adapter"
SDXL_UNET = "Stable Diffusion XL UNet/checkpoint"
SD15_UNET = "Stable Diffusion 1.x/2.x UNet/checkpoint"
SD3_MMDIT = "Stable Diffusion 3 MMDiT"
UNKNOWN = "unknown model"

# Where each component sits inside the files people have: bare, or inside an all-in-one checkpoint
# (ComfyUI "checkpoint" saves, LDM/SD-style files). prefix candidates, and key fragments that prove it.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
TRANSFORMER_ANCHORS = ("double_blocks.", "single_blocks.", "transformer_blocks.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
VAE_ANCHORS = ("encoder.down", "decoder.up", "encoder.conv_in")
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.",
                 "conditioner.embedders.0.transformer.", "transformer.")
CLIP_ANCHORS = ("embeddings.token_embedding",)
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "transformer.")
T5_ANCHORS = ("SelfAttention.", "encoder.block.")


def select_component(keys, prefixes, anchors) -> tuple[str, list]:
    """(prefix, keys under it) of the first prefix whose keys show one of `anchors`; ('', all keys)
    when the component is stored bare (or is not there: the family check then says what it is)."""
    keys = list(keys)
    for prefix in prefixes:
        sub = [k for k in keys if k.startswith(prefix)]
        if any(a in k[len(prefix):] for k in sub for a in anchors):
            return prefix, sub
    return "", keys


def identify_family(keys) -> str:
    keys = list(keys)
    ks = set(keys)
    joined_has = lambda s: any(s in k for k in keys)  # noqa: E731
    if joined_has("lora_A.") or joined_has("lora_B.") or joined_has("lora_down.") or joined_has("lora_up."):
        return LORA
    if joined_has("double_blocks.") and joined_has("single_blocks."):
        return FLUX_BFL
    if joined_has("single_transformer_blocks.") and joined_has("x_embedder"):
        return FLUX_DIFFUSERS
    if joined_has("joint_blocks."):
        return SD3_MMDIT
    if joined_has("input_blocks.") and joined_has("output_blocks."):
        if joined_has("label_emb.") or joined_has("conditioner.embedders.1"):
            return SDXL_UNET
        return SD15_UNET
    if joined_has("down_blocks.") and joined_has("up_blocks.") and joined_has("time_embedding."):
        return SD15_UNET if not joined_has("add_embedding.") else SDXL_UNET
    if joined_has("encoder.down.") and joined_has("decoder.up."):
        return FLUX_VAE_LDM
    if joined_has("encoder.down_blocks.") and joined_has("decoder.up_blocks."):
        return FLUX_VAE_DIFFUSERS
    if joined_has("SelfAttention.q.weight") or "shared.weight" in ks and joined_has("encoder.block."):
        return T5_ENCODER
    if joined_has("embeddings.token_embedding.weight") and joined_has("self_attn.q_proj"):
        return CLIP_TEXT
    return UNKNOWN


def describe_keys(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def wrong_family_error(path, family: str, expected: str, kind: str) -> ModelFileError:
    advice = {
        LORA: "A LoRA is an add-on, not a base model: give the base FLUX.1-dev file here and the LoRA "
              f"in its own slot ({COMFYUI_FOLDERS['lora']}).",
        SDXL_UNET: "GenRefocus runs on FLUX.1-dev only; SDXL models cannot be used.",
        SD15_UNET: "GenRefocus runs on FLUX.1-dev only; Stable Diffusion 1.x/2.x models cannot be used.",
        SD3_MMDIT: "GenRefocus runs on FLUX.1-dev only; SD3 models cannot be used.",
    }.get(family, "")
    return ModelFileError(f"{path}: expected a {expected}, but the file looks like this: {family}. {advice} "
                          f"The {kind} file belongs in {COMFYUI_FOLDERS.get(kind, 'its model folder')} "
                          f"(typically {TYPICAL_NAMES.get(kind, kind)}).".replace("  ", " "))


def check_flux_transformer_keys(path, keys) -> str:
    """Family of a transformer file; raise for anything that is not FLUX.1-dev (schnell included)."""
    keys = list(keys)
    family = identify_family(keys)
    if family not in (FLUX_BFL, FLUX_DIFFUSERS):
        raise wrong_family_error(path, family, "FLUX.1-dev transformer", "transformer")
    if family == FLUX_BFL and not any("guidance_in." in k for k in keys):
        raise ModelFileError(f"{path}: this is a FLUX transformer without a guidance embedding (guidance_in.*), "
                             "i.e. FLUX.1-schnell (or another guidance-distilled-free variant). The GenRefocus "
                             "LoRAs were trained on FLUX.1-dev, which has the guidance embedding; use "
                             "flux1-dev.safetensors.")
    if family == FLUX_DIFFUSERS and not any("guidance_embedder." in k for k in keys):
        raise ModelFileError(f"{path}: this FLUX transformer has no guidance embedder "
                             "(time_text_embed.guidance_embedder.*): it is FLUX.1-schnell, not FLUX.1-dev. "
                             "The GenRefocus LoRAs need FLUX.1-dev.")
    return family
