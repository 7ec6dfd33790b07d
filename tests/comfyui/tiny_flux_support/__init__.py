"""Test-only ComfyUI custom node: lets ComfyUI's own loaders read the shared tiny FLUX (never shipped).

ComfyUI detects a model's architecture from a file's keys and shapes but hard-codes a few numbers that
the shapes of the real FLUX.1-dev / ae.safetensors happen to fix. For the tiny test model those are
supplied here, and only when the file's shapes disagree with the hard-coded values (a real FLUX file
loads untouched):
- FLUX (comfy/model_detection.py): hidden size (rows of `img_in.weight`), heads (hidden size / length of
  `double_blocks.0.img_attn.norm.key_norm.scale`), context size (columns of `txt_in.weight`), all read
  from the file; the rotary axes split `axes_dim` (not derivable from shapes, only its sum is) from the
  tiny configs.json.
- VAE (comfy/sd.py, the SD/FLUX KL branch): base channels, channel multipliers and resnets per level read
  from the file; the GroupNorm group count (32 in ComfyUI's `Normalize`, 8 in the tiny VAE, not
  derivable from shapes) from the tiny configs.json.
Everything else -- state dict conversion, model classes, ops (fp8 casts, GGUF dequantisation via
ComfyUI-GGUF), memory management, sampling -- is ComfyUI's real path.

The node "TinyFluxPromptConditioning" returns the stored prompt embeddings of the tiny set as a FLUX
CONDITIONING (ComfyUI's FLUX text encoder has fixed CLIP-L / T5-XXL sizes and vocabularies; the tiny
encoders cannot go through DualCLIPLoader).

GENREFOCUS_TINY_DIR names the tiny folder ($GENREFOCUS_PARITY_DIR/tiny: configs.json,
prompt_embeds.safetensors); tests/comfyui/conftest.py sets it and links this folder into the test
server's custom_nodes.
"""
import contextlib
import json
import logging
import os
from pathlib import Path

import comfy.ldm.modules.diffusionmodules.model as kl_vae_modules
import comfy.model_detection
import comfy.sd

log = logging.getLogger(__name__)
TINY_DIR_ENV = "GENREFOCUS_TINY_DIR"


def _tiny_dir() -> Path:
    d = os.environ.get(TINY_DIR_ENV)
    if not d or not (Path(d) / "configs.json").is_file():
        raise RuntimeError(f"{TINY_DIR_ENV}={d!r}: needs the shared tiny folder (with configs.json) "
                           "to supply the tiny FLUX's rotary split and VAE group count")
    return Path(d)


def _tiny_configs() -> dict:
    return json.loads((_tiny_dir() / "configs.json").read_text())


# --------------------------------------------------------------------------------------------- FLUX
_detect_unet_config = comfy.model_detection.detect_unet_config


def detect_unet_config(state_dict, key_prefix, metadata=None):
    config = _detect_unet_config(state_dict, key_prefix, metadata=metadata)
    img_in = state_dict.get(f"{key_prefix}img_in.weight")
    if not config or config.get("image_model") != "flux" or img_in is None:
        return config
    hidden = int(img_in.shape[0])
    if hidden == config["hidden_size"]:
        return config
    head_dim = int(state_dict[f"{key_prefix}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0])
    tiny = {"hidden_size": hidden, "num_heads": hidden // head_dim,
            "context_in_dim": int(state_dict[f"{key_prefix}txt_in.weight"].shape[1]),
            "axes_dim": list(_tiny_configs()["transformer"]["axes_dims_rope"])}
    log.info("tiny FLUX (test-only detection): %s", tiny)
    config.update(tiny)
    return config


comfy.model_detection.detect_unet_config = detect_unet_config


# ---------------------------------------------------------------------------------------------- VAE
def _count(keys, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


def _tiny_kl_vae_shape(sd) -> dict | None:
    """ch / ch_mult / num_res_blocks of an LDM-layout KL VAE whose base width is not ComfyUI's 128."""
    w = sd.get("encoder.conv_in.weight")
    if w is None or "decoder.conv_in.weight" not in sd or w.shape[0] == 128 or "decoder.mid.block_1.mix_factor" in sd:
        return None
    ch = int(w.shape[0])
    levels = _count(sd.keys(), "encoder.down.{}.")
    return {"ch": ch, "num_res_blocks": _count(sd.keys(), "encoder.down.0.block.{}."),
            "ch_mult": [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels)]}


@contextlib.contextmanager
def _kl_vae_built_as(shape: dict, groups: int):
    """While ComfyUI builds its KL VAE: these sizes in its ddconfig, `groups` in its GroupNorms."""
    engine, defaults = comfy.sd.AutoencodingEngine, kl_vae_modules.Normalize.__defaults__

    def tiny_engine(*args, encoder_config, decoder_config, **kwargs):
        encoder_config["params"].update(shape)
        decoder_config["params"].update(shape)
        return engine(*args, encoder_config=encoder_config, decoder_config=decoder_config, **kwargs)

    comfy.sd.AutoencodingEngine, kl_vae_modules.Normalize.__defaults__ = tiny_engine, (groups,)
    try:
        yield
    finally:
        comfy.sd.AutoencodingEngine, kl_vae_modules.Normalize.__defaults__ = engine, defaults


_vae_init = comfy.sd.VAE.__init__


def vae_init(self, sd=None, device=None, config=None, dtype=None, metadata=None):
    if sd is not None and "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:  # diffusers layout
        from comfy import diffusers_convert
        sd = diffusers_convert.convert_vae_state_dict(sd)
    shape = _tiny_kl_vae_shape(sd) if sd is not None and config is None else None
    if shape is None:
        return _vae_init(self, sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)
    groups = int(_tiny_configs()["vae"]["norm_num_groups"])
    log.info("tiny VAE (test-only detection): %s, %d groups", shape, groups)
    with _kl_vae_built_as(shape, groups):
        return _vae_init(self, sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)


comfy.sd.VAE.__init__ = vae_init


# ------------------------------------------------------------------------------------ conditioning
class TinyFluxPromptConditioning:
    """The tiny set's stored prompt embeddings (T5 hidden states + CLIP pooled) as FLUX CONDITIONING."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"stage": (["deblur", "bokeh"],)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, stage):
        from safetensors.torch import load_file

        e = load_file(str(_tiny_dir() / "prompt_embeds.safetensors"))
        return ([[e[f"{stage}_prompt_embeds"], {"pooled_output": e[f"{stage}_pooled_prompt_embeds"]}]],)


NODE_CLASS_MAPPINGS = {"TinyFluxPromptConditioning": TinyFluxPromptConditioning}
