"""Loading FLUX.1-dev's parts offline: transformer, VAE, CLIP-L and T5 encoders, tokenizers.

Two sources are accepted for every part:
- a diffusers folder (``model_index.json`` with ``transformer/``, ``vae/``, ``text_encoder/``,
  ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``), or the component's own sub-folder;
- the single files ComfyUI users have: ``flux1-dev.safetensors`` (original Black Forest Labs key
  layout, bf16 or fp8 with optional per-tensor scales), ``ae.safetensors``, ``clip_l.safetensors``,
  ``t5xxl_*.safetensors``. Their architecture configs ship in ``genrefocus_core/generative/configs/``.

Nothing is ever fetched: every diffusers/transformers call gets a local path and
``local_files_only=True``, inside a context that also switches the hub client to offline mode.

The transformer's original layout is converted by our own key table rather than diffusers'
``convert_flux_transformer_checkpoint_to_diffusers``: that function hard-codes FLUX.1-dev's hidden
size (3072) and MLP ratio, so it cannot read smaller test models, and loading through
``from_single_file`` upcasts fp8 weights to the model dtype and ignores fp8 scale tensors. The tests
check that both conversions agree key by key and shape by shape on the real FLUX.1-dev layout.
"""
from __future__ import annotations

import contextlib
import logging
import json
import os
from pathlib import Path

import torch

from . import model_files as mf
from ..basics.errors import ModelFileError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FLUX_DEV_TRANSFORMER_CONFIG = CONFIG_DIR / "flux1-dev" / "transformer"
FLUX_DEV_VAE_CONFIG = CONFIG_DIR / "flux1-dev" / "vae"
FLUX_DEV_SCHEDULER_CONFIG = CONFIG_DIR / "flux1-dev" / "scheduler"
CLIP_L_CONFIG = CONFIG_DIR / "clip_l"
T5_XXL_CONFIG = CONFIG_DIR / "t5xxl"

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_IGNORED_EXTRA_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_IGNORED_EXTRA_KEYS = ("scaled_fp8",)


@contextlib.contextmanager
def offline_hub():
    """Force huggingface_hub (used by diffusers and transformers) into offline mode for the block."""
    import huggingface_hub.constants as hub_constants

    old_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    old_const = hub_constants.HF_HUB_OFFLINE
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_const
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _config_dir(config_dir, default: Path, filename: str = "config.json") -> Path:
    d = Path(config_dir) if config_dir is not None else default
    if not (d / filename).is_file():
        raise mf.MissingModelFileError(filename, d, "A model config folder must contain it.")
    return d


def _folder_or_file(path_or_dir, subfolder: str, kind: str):
    """(component folder, None) when given a diffusers folder, else (None, the checked single file)."""
    p = Path(path_or_dir).expanduser() if path_or_dir is not None else None
    if p is not None and p.is_dir():
        return mf.require_diffusers_component(p, subfolder, kind), None
    return None, mf.require_file(p, kind)


def _load_json(path: Path) -> dict:
    return mf.read_json_config(path)


@contextlib.contextmanager
def offline_load(source, what: str):
    """Offline hub, and whatever diffusers/transformers raise on a damaged folder (a config with wrong
    fields, weights that do not fit it) as a ModelFileError naming the folder and the part."""
    with offline_hub():
        try:
            yield
        except (ModelFileError, MemoryError):
            raise
        except Exception as e:  # the libraries raise OSError, ValueError, KeyError, their own errors...
            raise ModelFileError(f"{source}: cannot be loaded as {what} ({type(e).__name__}: {e}). The folder is "
                                 "damaged or holds another model; download it again.") from None


def _assert_materialised(model: torch.nn.Module, source) -> None:
    """No parameter may be left on the meta device (a key the file did not provide)."""
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelFileError(f"{source}: the file lacks {len(missing)} weights of this model, e.g. "
                             f"{mf.describe_keys(missing)}. It is incomplete or a different model.")


def _check_shapes(source, converted: dict, expected: dict, what: str, hint: str = "") -> None:
    missing = [k for k in expected if k not in converted]
    if missing:
        raise ModelFileError(f"{source}: not a complete {what}: {len(missing)} weights are missing, e.g. "
                             f"{mf.describe_keys(missing)}. {hint}".strip())
    bad = [(k, tuple(converted[k].shape), tuple(expected[k].shape)) for k in expected
           if tuple(converted[k].shape) != tuple(expected[k].shape)]
    if bad:
        k, got, want = bad[0]
        raise ModelFileError(f"{source}: weight shapes do not fit {what} ({len(bad)} differ; e.g. '{k}' is "
                             f"{list(got)}, the config expects {list(want)}). {hint}".strip())


def _split_fp8_scales(tensors: dict) -> tuple[dict, dict]:
    """Separate per-tensor fp8 scales ('x.scale_weight' / 'x.weight_scale' -> 'x.weight') and drop markers.

    Scalar scales travel with their weight (fp8 storage can keep them); a weight with a per-channel
    scale is dequantised to bf16 here, before any fused tensor is cut into pieces."""
    weights, scales = {}, {}
    for k, v in tensors.items():
        if k.endswith(_FP8_SCALE_SUFFIXES):
            base = k.rsplit(".", 1)[0]
            scales[base + ".weight"] = v.float()
        elif k.endswith(_IGNORED_EXTRA_SUFFIXES) or k in _IGNORED_EXTRA_KEYS:
            continue
        else:
            weights[k] = v
    for k, scale in list(scales.items()):
        if k not in weights:
            del scales[k]
        elif scale.numel() != 1:
            w = weights[k].to(torch.float32)
            try:
                weights[k] = (w * scale.reshape(scale.shape + (1,) * (w.ndim - scale.ndim))).to(torch.bfloat16)
            except RuntimeError:
                raise ModelFileError(f"fp8 scale of '{k}' has shape {list(scale.shape)}, which does not fit the "
                                     f"weight {list(w.shape)}.") from None
            del scales[k]
        else:
            scales[k] = scale.reshape(())
    return weights, scales


def _read_tensors(path: Path, keys, prefix: str = "") -> dict:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in keys:
                out[k[len(prefix):] if prefix and k.startswith(prefix) else k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise ModelFileError(f"{path}: cannot read tensors ({type(e).__name__}: {e}).") from None
    return out


def dequantize(weight: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(torch.float32) if weight.dtype in FP8_DTYPES else weight
    if scale is not None:
        w = w.to(torch.float32) * scale.to(torch.float32)
    return w.to(dtype)


# ---------------------------------------------------------------------------------------------
# Transformer: original (BFL) key layout -> diffusers FluxTransformer2DModel

def bfl_transformer_key_plan(num_layers: int, num_single_layers: int, inner_dim: int, mlp_hidden_dim: int,
                             guidance: bool = True) -> dict:
    """diffusers key -> (BFL key, op); op is None, ("chunk", i) of a fused qkv, ("split", i) of
    single-block linear1 = [q, k, v, mlp], or "swap" (final AdaLN: BFL stores shift, scale)."""
    plan = {}

    def linear(dst, src, op=None, bias=True):
        plan[f"{dst}.weight"] = (f"{src}.weight", op)
        if bias:
            plan[f"{dst}.bias"] = (f"{src}.bias", op)

    linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if guidance:
        linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    linear("context_embedder", "txt_in")
    linear("x_embedder", "img_in")
    for i in range(num_layers):
        d, s = f"transformer_blocks.{i}", f"double_blocks.{i}"
        linear(f"{d}.norm1.linear", f"{s}.img_mod.lin")
        linear(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin")
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            linear(f"{d}.attn.{name}", f"{s}.img_attn.qkv", ("chunk", j))
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            linear(f"{d}.attn.{name}", f"{s}.txt_attn.qkv", ("chunk", j))
        plan[f"{d}.attn.norm_q.weight"] = (f"{s}.img_attn.norm.query_norm.scale", None)
        plan[f"{d}.attn.norm_k.weight"] = (f"{s}.img_attn.norm.key_norm.scale", None)
        plan[f"{d}.attn.norm_added_q.weight"] = (f"{s}.txt_attn.norm.query_norm.scale", None)
        plan[f"{d}.attn.norm_added_k.weight"] = (f"{s}.txt_attn.norm.key_norm.scale", None)
        linear(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0")
        linear(f"{d}.ff.net.2", f"{s}.img_mlp.2")
        linear(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0")
        linear(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2")
        linear(f"{d}.attn.to_out.0", f"{s}.img_attn.proj")
        linear(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj")
    for i in range(num_single_layers):
        d, s = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        linear(f"{d}.norm.linear", f"{s}.modulation.lin")
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
            linear(f"{d}.{name}", f"{s}.linear1", ("split", j))
        plan[f"{d}.attn.norm_q.weight"] = (f"{s}.norm.query_norm.scale", None)
        plan[f"{d}.attn.norm_k.weight"] = (f"{s}.norm.key_norm.scale", None)
        linear(f"{d}.proj_out", f"{s}.linear2")
    linear("proj_out", "final_layer.linear")
    linear("norm_out.linear", "final_layer.adaLN_modulation.1", "swap")
    plan["_split_sizes"] = (inner_dim, inner_dim, inner_dim, mlp_hidden_dim)
    return plan


def convert_bfl_transformer(tensors: dict, config: dict, scales: dict | None = None,
                            source="checkpoint") -> tuple[dict, dict]:
    """BFL-layout tensors (prefix already stripped) -> (diffusers-layout tensors, diffusers key -> fp8 scale).

    Tensors are converted in their stored dtype (fp8 stays fp8); scales follow the slices cut from
    the fused tensor they belong to. `config` is the FluxTransformer2DModel config dict.
    """
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    plan = bfl_transformer_key_plan(int(config["num_layers"]), int(config["num_single_layers"]), inner,
                                    int(inner * 4.0), bool(config.get("guidance_embeds", True)))
    split_sizes = plan.pop("_split_sizes")
    scales = scales or {}
    needed = sorted({src for src, _ in plan.values()})
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ModelFileError(f"{source}: not a complete FLUX.1-dev transformer for this config: {len(missing)} "
                             f"keys are missing, e.g. {mf.describe_keys(missing)}. The file may be truncated, "
                             "a different FLUX variant, or need another config (config_dir).")
    unused = sorted(set(tensors) - set(needed))
    if unused:
        log.warning("%s: %d tensors are not part of FLUX.1-dev and were ignored, e.g. %s", source, len(unused),
                    mf.describe_keys(unused))
    out, out_scales = {}, {}
    for dst, (src, op) in plan.items():
        t = tensors[src]
        if op is None:
            v = t
        elif op == "swap":
            shift, scale = t.chunk(2, dim=0)
            v = torch.cat([scale, shift], dim=0)
        elif op[0] == "chunk":
            if t.shape[0] % 3:
                raise ModelFileError(f"{source}: fused qkv '{src}' has {t.shape[0]} rows, not a multiple of 3.")
            v = t.chunk(3, dim=0)[op[1]]
        else:
            if t.shape[0] != sum(split_sizes):
                raise ModelFileError(f"{source}: '{src}' has {t.shape[0]} rows; the config expects "
                                     f"{sum(split_sizes)} (q, k, v {split_sizes[0]} each + MLP {split_sizes[3]}). "
                                     "Wrong config for this file?")
            v = torch.split(t, split_sizes, dim=0)[op[1]]
        out[dst] = v.contiguous() if v.device.type != "meta" else v
        if src in scales:
            out_scales[dst] = scales[src]
    return out, out_scales


def _is_fp8_storable(name: str) -> bool:
    """Linear weights inside the transformer blocks (>99 % of FLUX's parameters) may stay in fp8."""
    return name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".weight") \
        and ".norm_" not in name and not name.endswith(("norm_q.weight", "norm_k.weight"))


def load_flux_transformer(path_or_dir, dtype: torch.dtype = torch.bfloat16, *, config_dir=None,
                          keep_fp8: bool = False):
    """FluxTransformer2DModel (FLUX.1-dev) from a diffusers folder or a single safetensors file.

    `dtype` is the compute/storage dtype of all weights. With `keep_fp8=True` the Linear weights of
    the blocks are stored as float8_e4m3fn (kept as is from an fp8 file, quantised otherwise) and
    upcast per layer at call time (see memory.to_fp8_storage).
    `config_dir`: folder with config.json for single files (default: shipped FLUX.1-dev config).
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from .memory import to_fp8_storage

    folder, path = _folder_or_file(path_or_dir, "transformer", "transformer")
    if folder is not None:
        cfg = _load_json(folder / "config.json")
        if cfg.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
            raise ModelFileError(f"{folder}: holds a {cfg.get('_class_name')}, not a FluxTransformer2DModel.")
        if not cfg.get("guidance_embeds", False):
            raise ModelFileError(f"{folder}: this FLUX transformer has guidance_embeds=false: it is FLUX.1-schnell "
                                 "(no guidance embedding), but the GenRefocus LoRAs need FLUX.1-dev.")
        with offline_load(folder, "a FLUX.1-dev transformer"):
            model = FluxTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                           use_safetensors=True)
        model.eval().requires_grad_(False)
        if keep_fp8:
            to_fp8_storage(model, compute_dtype=dtype)
        return model

    header = mf.read_safetensors_header(path)
    prefix, keys = mf.select_component(header.keys(), mf.TRANSFORMER_PREFIXES, mf.TRANSFORMER_ANCHORS)
    family = mf.check_flux_transformer_keys(path, [k[len(prefix):] for k in keys])
    cfg_dir = _config_dir(config_dir, FLUX_DEV_TRANSFORMER_CONFIG)
    with offline_load(cfg_dir, "a FLUX transformer config"):
        config = dict(FluxTransformer2DModel.load_config(str(cfg_dir)))
    tensors, scales = _split_fp8_scales(_read_tensors(path, keys, prefix))
    if family == mf.FLUX_BFL:
        tensors, scales = convert_bfl_transformer(tensors, config, scales, source=path)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    expected = model.state_dict()
    hint = f"(config used: {cfg_dir}; the shipped one is FLUX.1-dev's, pass config_dir for other sizes.)"
    _check_shapes(path, tensors, expected, "a FLUX.1-dev transformer", hint)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        log.warning("%s: %d tensors are not part of this transformer and were ignored, e.g. %s", path, len(extra),
                    mf.describe_keys(extra))
    state = {}
    fp8_scales = {}
    for name in expected:
        t = tensors.pop(name)  # release each source tensor as soon as it is converted
        if keep_fp8 and t.dtype == torch.float8_e4m3fn and _is_fp8_storable(name):
            state[name] = t  # kept byte for byte (other fp8 formats are re-quantised by to_fp8_storage)
            fp8_scales[name] = scales.get(name)
        else:
            state[name] = dequantize(t, scales.get(name), dtype)
    model.load_state_dict(state, strict=True, assign=True)
    _assert_materialised(model, path)
    model.eval().requires_grad_(False)
    if keep_fp8:
        to_fp8_storage(model, compute_dtype=dtype, prequantized_scales=fp8_scales)
    return model


# ---------------------------------------------------------------------------------------------
# VAE

def load_flux_vae(path_or_dir, dtype: torch.dtype = torch.float32, *, config_dir=None):
    """AutoencoderKL (FLUX's 16-channel ae) from a diffusers folder or a single file (`ae.safetensors`)."""
    from diffusers import AutoencoderKL

    folder, path = _folder_or_file(path_or_dir, "vae", "vae")
    if folder is not None:
        with offline_load(folder, "the FLUX autoencoder"):
            vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                use_safetensors=True)
    else:
        header = mf.read_safetensors_header(path)
        prefix, keys = mf.select_component(header.keys(), mf.VAE_PREFIXES, mf.VAE_ANCHORS)
        family = mf.identify_family([k[len(prefix):] for k in keys])
        if family not in (mf.FLUX_VAE_LDM, mf.FLUX_VAE_DIFFUSERS):
            raise mf.wrong_family_error(path, family, "FLUX autoencoder (ae.safetensors)", "vae")
        cfg_dir = _config_dir(config_dir, FLUX_DEV_VAE_CONFIG)
        cfg = _load_json(cfg_dir / "config.json")
        conv_out = next((k for k in keys if k.endswith("encoder.conv_out.weight")), None)
        want = 2 * int(cfg["latent_channels"])
        if conv_out is not None and header.shape(conv_out)[0] != want:
            got = header.shape(conv_out)[0] // 2
            raise ModelFileError(f"{path}: this autoencoder has {got} latent channels; FLUX's has "
                                 f"{cfg['latent_channels']}. " + ("It is an SD 1.x/SDXL VAE: use FLUX's ae.safetensors "
                                 f"in {mf.COMFYUI_FOLDERS['vae']}." if got == 4 else ""))
        tensors = _read_tensors(path, keys, prefix)  # only the VAE, also from an all-in-one checkpoint
        with offline_load(f"{path} (config {cfg_dir})", "a FLUX autoencoder"):
            vae = AutoencoderKL.from_single_file(tensors, config=str(cfg_dir), local_files_only=True,
                                                 torch_dtype=dtype)
        _assert_materialised(vae, path)
    vae.eval().requires_grad_(False)
    return vae


# ---------------------------------------------------------------------------------------------
# Text encoders and tokenizers

def _dtype_argument(dtype) -> dict:
    """transformers' from_pretrained keyword for the weights' dtype: `dtype` where the installed release's
    configs declare it (5.x), else `torch_dtype` (4.x, where `dtype` would land in the config as an
    unknown, unserialisable attribute)."""
    import inspect

    from transformers import PretrainedConfig

    declared = "dtype" in inspect.signature(PretrainedConfig.__init__).parameters
    return {"dtype" if declared else "torch_dtype": dtype}


def _load_text_encoder(path_or_dir, dtype, config_dir, *, kind: str, subfolder: str, model_cls, config_cls,
                       default_config: Path, prefixes, anchors, expected_family: str, rename, drop):
    """A transformers text encoder from a diffusers folder's `subfolder`, or from a single file (any
    key prefix, fp8 with scales) with the config in `config_dir` (default: the shipped one)."""
    from accelerate import init_empty_weights

    folder, path = _folder_or_file(path_or_dir, subfolder, kind)
    if folder is not None:
        with offline_load(folder, f"the {kind} text encoder"):
            # .to(dtype) too: T5 keeps its `wo` projections in fp32 when loaded in a lower precision
            model, info = model_cls.from_pretrained(str(folder), **_dtype_argument(dtype), local_files_only=True,
                                                    use_safetensors=True, output_loading_info=True)
            if info["missing_keys"]:
                _load_renamed(model, folder, rename, kind)
        return model.to(dtype).eval().requires_grad_(False)
    cfg_dir = _config_dir(config_dir, default_config)
    with offline_load(cfg_dir, f"a {kind} text encoder config"):
        config = config_cls.from_pretrained(str(cfg_dir), local_files_only=True)
    header = mf.read_safetensors_header(path)
    prefix, keys = mf.select_component(header.keys(), prefixes, anchors)
    family = mf.identify_family([k[len(prefix):] for k in keys])
    if family != expected_family:
        raise mf.wrong_family_error(path, family, expected_family, kind)
    tensors, scales = _split_fp8_scales(_read_tensors(path, keys, prefix))
    tensors = {k: v for k, v in tensors.items() if not any(k.startswith(d) or k == d for d in drop)}
    with init_empty_weights():
        model = model_cls(config)
    expected = {k: v for k, v in model.state_dict().items() if v.device.type == "meta"}
    tensors = rename(tensors, expected)
    _check_shapes(path, tensors, expected, f"{expected_family} for this config",
                  f"(Expected {mf.TYPICAL_NAMES[kind]}; pass a config folder for other sizes.)")
    state = {k: dequantize(tensors[k], scales.get(k), dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    _assert_materialised(model, path)
    return model.eval().requires_grad_(False)


def _load_renamed(model, folder: Path, rename, kind: str) -> None:
    """from_pretrained left weights of `model` unfilled: the folder names them another way (CLIP saved by
    transformers >= 5.6 has no 'text_model.' prefix, which 4.x does not translate). Fill every weight from
    the folder's safetensors files renamed to the model's keys, or raise naming what is missing."""
    from safetensors.torch import load_file

    expected = model.state_dict()
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    tensors = rename(tensors, expected)
    missing = sorted(k for k in expected if k not in tensors)
    if missing:
        raise ModelFileError(f"{folder}: the {kind} text encoder lacks {len(missing)} weight(s), e.g. "
                             f"{', '.join(missing[:3])}. The folder is damaged or holds another model.")
    model.load_state_dict({k: tensors[k].to(expected[k].dtype) for k in expected}, strict=True)


def _clip_keys(t, expected):
    """Files with and without 'text_model.' -> this transformers version's keys."""
    bare = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in t.items()}
    if any(k.startswith("text_model.") for k in expected):
        return {"text_model." + k: v for k, v in bare.items()}
    return bare


def _t5_keys(t, expected):
    """Token embeddings are stored as 'shared' and/or 'encoder.embed_tokens'."""
    emb = t.get("shared.weight", t.get("encoder.embed_tokens.weight"))
    if emb is not None:
        t["shared.weight"] = emb
        t["encoder.embed_tokens.weight"] = emb
    return t


def load_clip_text_encoder(path_or_dir, dtype: torch.dtype = torch.float32, *, config_dir=None):
    """transformers CLIPTextModel (CLIP-L) from a diffusers folder or `clip_l.safetensors`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return _load_text_encoder(path_or_dir, dtype, config_dir, kind="clip_l", subfolder="text_encoder",
                              model_cls=CLIPTextModel, config_cls=CLIPTextConfig, default_config=CLIP_L_CONFIG,
                              prefixes=mf.CLIP_PREFIXES, anchors=mf.CLIP_ANCHORS, expected_family=mf.CLIP_TEXT,
                              rename=_clip_keys, drop=("text_projection", "logit_scale"))


def load_t5_encoder(path_or_dir, dtype: torch.dtype = torch.float32, *, config_dir=None):
    """transformers T5EncoderModel (T5-XXL v1.1) from a diffusers folder or `t5xxl_*.safetensors`."""
    from transformers import T5Config, T5EncoderModel

    model = _load_text_encoder(path_or_dir, dtype, config_dir, kind="t5", subfolder="text_encoder_2",
                               model_cls=T5EncoderModel, config_cls=T5Config, default_config=T5_XXL_CONFIG,
                               prefixes=mf.T5_PREFIXES, anchors=mf.T5_ANCHORS, expected_family=mf.T5_ENCODER,
                               rename=_t5_keys, drop=("decoder.", "lm_head."))
    model.encoder.embed_tokens = model.shared  # one embedding, as a tied checkpoint has it
    return model


TOKENIZER_LAYOUTS = (
    ("tokenizer", "tokenizer_2"),  # diffusers folder
    ("comfy/sd1_tokenizer", "comfy/text_encoders/t5_tokenizer"),  # a ComfyUI install
    ("sd1_tokenizer", "text_encoders/t5_tokenizer"),  # ComfyUI's comfy/ package folder
)


def tokenizer_folders(tokenizer_dir) -> tuple[Path, Path]:
    """(CLIP tokenizer folder, T5 tokenizer folder) inside a diffusers folder or a ComfyUI install."""
    if tokenizer_dir is None:
        raise mf.MissingModelFileError("tokenizer/ and tokenizer_2/", "a FLUX.1-dev diffusers folder or a ComfyUI "
                                       "install", "Encoding prompts outside ComfyUI needs the CLIP and T5 tokenizers "
                                       "(pass tokenizer_dir / --tokenizer-dir), or precomputed prompt embeddings.")
    root = Path(tokenizer_dir).expanduser()
    for clip_sub, t5_sub in TOKENIZER_LAYOUTS:
        dirs = (root / clip_sub, root / t5_sub)
        if all((d / "tokenizer_config.json").is_file() for d in dirs):
            return dirs
    raise mf.MissingModelFileError("tokenizer/tokenizer_config.json and tokenizer_2/tokenizer_config.json", root,
                                   "The folder must be a FLUX diffusers folder (tokenizer/ = CLIP, tokenizer_2/ = T5) "
                                   "or a ComfyUI install (comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer).")


def load_tokenizers(tokenizer_dir):
    """(CLIP tokenizer, T5 tokenizer) from a FLUX diffusers folder (tokenizer/, tokenizer_2/) or a
    ComfyUI install, which ships both (comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer).

    Single-file encoders carry no tokenizer; either folder provides them (a few MB, nothing fetched).
    """
    from transformers import AutoTokenizer

    dirs = tokenizer_folders(tokenizer_dir)
    with offline_load(tokenizer_dir, "the CLIP and T5 tokenizers"):
        return tuple(AutoTokenizer.from_pretrained(str(d), local_files_only=True, **_special_token_arguments(d))
                     for d in dirs)


def _special_token_arguments(folder: Path) -> dict:
    """transformers 5 saves a tokenizer's unnamed extra special tokens as a list `extra_special_tokens`;
    transformers 4 reads that key as a dict of named tokens and calls the list `additional_special_tokens`.
    For a folder saved by 5.x loaded by a 4.x release (told apart by its tokenizers' special-token
    attributes), the list is passed under the 4.x name; otherwise nothing is overridden."""
    from transformers import PreTrainedTokenizerBase

    if "additional_special_tokens" not in PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES:
        return {}
    try:
        extra = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("extra_special_tokens")
    except (OSError, ValueError, AttributeError):
        return {}  # from_pretrained reports the unreadable file itself
    if not isinstance(extra, list):
        return {}
    return {"extra_special_tokens": {}, **({"additional_special_tokens": extra} if extra else {})}
