"""Test-only writers of the shared tiny FLUX in the files a ComfyUI user has.

From the diffusers-layout tiny weights of $GENREFOCUS_PARITY_DIR/tiny (see its README):
- `write_bfl_transformer`: the transformer as one safetensors file in Black Forest Labs' layout (what
  `models/diffusion_models/flux1-dev.safetensors` holds; ComfyUI's UNETLoader reads it);
- `write_gguf_transformer`: the same tensors quantised with the `gguf` package (what ComfyUI-GGUF's
  UnetLoaderGGUF reads; `gguf_tensor_type` says which tensors are quantised);
- `write_ldm_vae`: the VAE in the original (LDM) layout, like `models/vae/ae.safetensors`;
- `write_checkpoint`: transformer and VAE in one "checkpoint" file with the prefixes of ComfyUI's FLUX
  checkpoints (CheckpointLoaderSimple reads it).
Writes go to a temporary file in the target folder, then an atomic rename.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_TRANSFORMER_PREFIX = "model.diffusion_model."
CHECKPOINT_VAE_PREFIX = "vae."  # ComfyUI's FLUX checkpoints (SD ones use "first_stage_model.")
# Quantisation types the gguf package can write (it only dequantises the K-quants, e.g. Q4_K).
GGUF_QTYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def diffusers_to_bfl_transformer(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    """diffusers' FLUX state dict -> BFL's layout. Written out by hand on purpose, not derived from the
    core's `flux_loading.bfl_transformer_key_plan` (the reverse map): this is the test's independent
    oracle, so a wrong entry in the core's plan makes the round-trip tests fail instead of agreeing
    with itself."""
    out = {}

    def lin(src, dst):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def fused(srcs, dst):
        out[f"{dst}.weight"] = torch.cat([sd[f"{s}.weight"] for s in srcs], 0)
        out[f"{dst}.bias"] = torch.cat([sd[f"{s}.bias"] for s in srcs], 0)

    lin("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    lin("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    lin("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    lin("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        lin("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        lin("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    lin("context_embedder", "txt_in")
    lin("x_embedder", "img_in")
    for i in range(num_layers):
        d, s = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{d}.norm1.linear", f"{s}.img_mod.lin")
        lin(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin")
        fused([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{s}.img_attn.qkv")
        fused([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{s}.txt_attn.qkv")
        out[f"{s}.img_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{s}.img_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{s}.txt_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{s}.txt_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_added_k.weight"]
        lin(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0")
        lin(f"{d}.ff.net.2", f"{s}.img_mlp.2")
        lin(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0")
        lin(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2")
        lin(f"{d}.attn.to_out.0", f"{s}.img_attn.proj")
        lin(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj")
    for i in range(num_single_layers):
        d, s = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        lin(f"{d}.norm.linear", f"{s}.modulation.lin")
        fused([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{s}.linear1")
        out[f"{s}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{s}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        lin(f"{d}.proj_out", f"{s}.linear2")
    lin("proj_out", "final_layer.linear")
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2, 0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], 0)
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_ldm_vae(sd: dict, num_blocks: int) -> dict:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        new = k
        if ".down_blocks." in k:
            i = parts[2]
            rest = ".".join(parts[3:])
            rest = rest.replace("resnets.", "block.").replace("downsamplers.0.", "downsample.")
            new = f"encoder.down.{i}.{rest}"
        elif ".up_blocks." in k:
            i = num_blocks - 1 - int(parts[2])
            rest = ".".join(parts[3:])
            rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            new = f"decoder.up.{i}.{rest}"
        elif ".mid_block.resnets." in k:
            j = int(parts[3])
            new = f"{parts[0]}.mid.block_{j + 1}." + ".".join(parts[4:])
        elif ".mid_block.attentions.0." in k:
            rest = ".".join(parts[4:])
            rest = (rest.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                    .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            new = f"{parts[0]}.mid.attn_1.{rest}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[new] = v.contiguous()
    return out


# ------------------------------------------------------------------------------------------------
# the shared tiny weights in the original layouts

def tiny_configs(tiny_dir) -> dict:
    return json.loads((Path(tiny_dir) / "configs.json").read_text())


def tiny_bfl_transformer(tiny_dir) -> dict:
    """The tiny transformer's tensors in BFL layout (no prefix), fp32 as stored."""
    c = tiny_configs(tiny_dir)["transformer"]
    sd = load_file(str(Path(tiny_dir) / "transformer.safetensors"))
    return diffusers_to_bfl_transformer(sd, c["num_layers"], c["num_single_layers"])


def tiny_ldm_vae(tiny_dir) -> dict:
    blocks = len(tiny_configs(tiny_dir)["vae"]["block_out_channels"])
    return diffusers_to_ldm_vae(load_file(str(Path(tiny_dir) / "vae.safetensors")), blocks)


def _atomic_target(path) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return path, Path(tmp)


def save_safetensors(tensors: dict, path) -> Path:
    path, tmp = _atomic_target(path)
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bfl_transformer(tiny_dir, path, dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    """The tiny transformer as one BFL-layout safetensors file (BFL's own files have no key prefix)."""
    return save_safetensors({prefix + k: v.to(dtype) for k, v in tiny_bfl_transformer(tiny_dir).items()}, path)


def write_ldm_vae(tiny_dir, path) -> Path:
    return save_safetensors(tiny_ldm_vae(tiny_dir), path)


def write_checkpoint(tiny_dir, path) -> Path:
    """Transformer and VAE in one file under ComfyUI's checkpoint prefixes (no text encoders)."""
    tensors = {CHECKPOINT_TRANSFORMER_PREFIX + k: v for k, v in tiny_bfl_transformer(tiny_dir).items()}
    tensors.update({CHECKPOINT_VAE_PREFIX + k: v for k, v in tiny_ldm_vae(tiny_dir).items()})
    return save_safetensors(tensors, path)


def gguf_tensor_type(name: str, shape, qtype: str):
    """GGML type of one tensor in a `qtype` file.

    Quantised: 2-D Linear weights whose rows (the input features, the last dimension) are a whole
    number of the type's blocks (32 values for Q8_0..Q4_1); ComfyUI-GGUF dequantises them on the fly.
    F32: everything else -- biases and RMSNorm scales (1-D, which ComfyUI-GGUF's loader and city96's
    convert.py keep unquantised). In the tiny FLUX every 2-D weight has 32, 64, 128, 160 or 256 inputs, so
    all of them are quantised, including the 32x32 ones that city96's convert.py would keep in F32 by
    its 1024-element size threshold: that way dequantisation runs in every Linear of the model.
    """
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[t][0]
    if name.endswith(".weight") and len(shape) == 2 and shape[-1] % block == 0:
        return t
    return gguf.GGMLQuantizationType.F32


def write_gguf_transformer(tiny_dir, path, qtype: str = "Q8_0") -> Path:
    """The tiny BFL transformer as a GGUF file (architecture "flux", BFL key names, no prefix), as
    city96's convert.py + llama.cpp quantisation would make it; tensor types from `gguf_tensor_type`."""
    import gguf
    import numpy as np

    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype {qtype!r}: the gguf package writes {', '.join(GGUF_QTYPES)}")
    path, tmp = _atomic_target(path)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    for name, tensor in tiny_bfl_transformer(tiny_dir).items():
        t = gguf_tensor_type(name, tuple(tensor.shape), qtype)
        data = gguf.quants.quantize(tensor.float().numpy().astype(np.float32), t)
        writer.add_tensor(name, data, raw_dtype=t)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
