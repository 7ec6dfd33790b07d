"""Apple's `depth_pro.pt` layout <-> transformers' DepthProForDepthEstimation layout.

Apple's checkpoint (github apple/ml-depth-pro, also shipped by the GenRefocus release) is a plain
state dict of 1119 tensors whose three ViT-L backbones are timm modules with a fused `qkv` projection.
transformers holds the same weights in 1407 tensors: Dinov2 backbones with separate q/k/v projections,
and the decoder levels numbered in the opposite order. The correspondence, level by level:

    Apple                                   transformers
    encoder.patch_encoder / image_encoder   depth_pro.encoder.{patch,image}_encoder.model (Dinov2)
    fov.encoder.0 / fov.encoder.1           fov_model.fov_encoder.model (Dinov2) / fov_model.fov_encoder.neck
    encoder.upsample_lowres                 depth_pro.neck.feature_upsample.image_block.layers.0
    encoder.upsample{0,1,2}                 ...feature_upsample.scaled_images.{2,1,0}  (full, 1/2, 1/4 res)
    encoder.upsample_latent{0,1}            ...feature_upsample.intermediate.{1,0}    (hooks of block 5, 11)
    encoder.fuse_lowres                     depth_pro.neck.fuse_image_with_low_res
    decoder.convs.{i}                       depth_pro.neck.feature_projection.projections.{4-i}
    decoder.fusions.0 / .{i>0}              fusion_stage.final / fusion_stage.intermediate.{4-i}
      resnet{r}.residual.{1,3}                residual_layer{r}.convolution{1,2}
      out_conv                                projection
    head.{j}                                head.layers.{j}
    fov.downsample.0                        fov_model.conv
    fov.head.{j}                            fov_model.head.layers.{j}

The level counts (3 image scales, 2 intermediate hooks, 5 decoder levels) are fixed by Apple's
architecture, whose module names hard-code them; widths and depths follow the tensors, so a smaller
model of the same topology (the tests' tiny one) maps the same way.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from ..basics.errors import ModelFileError

APPLE_TENSOR_COUNT = 1119  # the released depth_pro.pt
HF_TENSOR_COUNT = 1407  # transformers' DepthProForDepthEstimation with the FOV model

_NUM_SCALES = 3  # Apple: upsample0 (full resolution), upsample1 (1/2), upsample2 (1/4)
_NUM_HOOKS = 2  # Apple: upsample_latent0 (block 5), upsample_latent1 (block 11)
_NUM_LEVELS = 5  # decoder levels = hooks + scales

# Apple ViT prefix -> transformers Dinov2 prefix.
_VIT_PREFIXES = {
    "encoder.patch_encoder.": "depth_pro.encoder.patch_encoder.model.",
    "encoder.image_encoder.": "depth_pro.encoder.image_encoder.model.",
    "fov.encoder.0.": "fov_model.fov_encoder.model.",
}

_QKV = ("q_proj", "k_proj", "v_proj")


def _vit_key_to_hf(rest: str) -> list[str] | None:
    """timm ViT key (after the prefix) -> Dinov2 key(s); a fused qkv gives three keys (q, k, v)."""
    simple = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    if rest in simple:
        return [simple[rest]]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if not m:
        return None
    layer, inner = f"encoder.layer.{m.group(1)}.", m.group(2)
    m2 = re.fullmatch(r"attn\.qkv\.(weight|bias)", inner)
    if m2:
        return [f"{layer}attention.{p}.{m2.group(1)}" for p in _QKV]
    m2 = re.fullmatch(r"attn\.proj\.(weight|bias)", inner)
    if m2:
        return [f"{layer}attention.o_proj.{m2.group(1)}"]
    m2 = re.fullmatch(r"ls([12])\.gamma", inner)
    if m2:
        return [f"{layer}layer_scale{m2.group(1)}.lambda1"]
    m2 = re.fullmatch(r"(norm[12]|mlp\.fc[12])\.(weight|bias)", inner)
    if m2:
        return [f"{layer}{inner}"]
    return None


def _fusion_name(apple_index: int) -> str:
    if apple_index == 0:
        return "fusion_stage.final"
    return f"fusion_stage.intermediate.{_NUM_LEVELS - 1 - apple_index}"


def apple_key_to_hf(key: str) -> list[str] | None:
    """One Apple key -> its transformers key(s) (three for a fused qkv, in q, k, v order), or None
    for a key that has no place in the model."""
    for prefix, hf_prefix in _VIT_PREFIXES.items():
        if key.startswith(prefix):
            inner = _vit_key_to_hf(key[len(prefix):])
            return None if inner is None else [hf_prefix + k for k in inner]

    up = "depth_pro.neck.feature_upsample."
    rules: list[tuple[str, callable]] = [
        (r"encoder\.upsample_lowres\.(weight|bias)", lambda m: f"{up}image_block.layers.0.{m[1]}"),
        (r"encoder\.upsample([0-2])\.(\d+)\.weight",
         lambda m: f"{up}scaled_images.{_NUM_SCALES - 1 - int(m[1])}.layers.{m[2]}.weight"),
        (r"encoder\.upsample_latent([01])\.(\d+)\.weight",
         lambda m: f"{up}intermediate.{_NUM_HOOKS - 1 - int(m[1])}.layers.{m[2]}.weight"),
        (r"encoder\.fuse_lowres\.(weight|bias)", lambda m: f"depth_pro.neck.fuse_image_with_low_res.{m[1]}"),
        (r"decoder\.convs\.([0-4])\.weight",
         lambda m: f"depth_pro.neck.feature_projection.projections.{_NUM_LEVELS - 1 - int(m[1])}.weight"),
        (r"decoder\.fusions\.([0-4])\.resnet([12])\.residual\.([13])\.(weight|bias)",
         lambda m: f"{_fusion_name(int(m[1]))}.residual_layer{m[2]}.convolution{(int(m[3]) + 1) // 2}.{m[4]}"),
        (r"decoder\.fusions\.([1-4])\.deconv\.weight", lambda m: f"{_fusion_name(int(m[1]))}.deconv.weight"),
        (r"decoder\.fusions\.([0-4])\.out_conv\.(weight|bias)",
         lambda m: f"{_fusion_name(int(m[1]))}.projection.{m[2]}"),
        (r"head\.(\d+)\.(weight|bias)", lambda m: f"head.layers.{m[1]}.{m[2]}"),
        (r"fov\.encoder\.1\.(weight|bias)", lambda m: f"fov_model.fov_encoder.neck.{m[1]}"),
        (r"fov\.downsample\.0\.(weight|bias)", lambda m: f"fov_model.conv.{m[1]}"),
        (r"fov\.head\.(\d+)\.(weight|bias)", lambda m: f"fov_model.head.layers.{m[1]}.{m[2]}"),
    ]
    for pattern, target in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return [target(m)]
    return None


def hf_key_to_apple(key: str) -> tuple[str, int | None] | None:
    """One transformers key -> (Apple key, part) where part is 0/1/2 for q/k/v of a fused qkv and
    None otherwise; None for a key with no Apple counterpart."""
    for prefix, hf_prefix in _VIT_PREFIXES.items():
        if not key.startswith(hf_prefix):
            continue
        rest = key[len(hf_prefix):]
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
        }
        if rest in simple:
            return prefix + simple[rest], None
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", rest)
        if not m:
            return None
        block, inner = f"blocks.{m.group(1)}.", m.group(2)
        m2 = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", inner)
        if m2:
            return f"{prefix}{block}attn.qkv.{m2.group(2)}", "qkv".index(m2.group(1))
        m2 = re.fullmatch(r"attention\.o_proj\.(weight|bias)", inner)
        if m2:
            return f"{prefix}{block}attn.proj.{m2.group(1)}", None
        m2 = re.fullmatch(r"layer_scale([12])\.lambda1", inner)
        if m2:
            return f"{prefix}{block}ls{m2.group(1)}.gamma", None
        if re.fullmatch(r"(norm[12]|mlp\.fc[12])\.(weight|bias)", inner):
            return prefix + block + inner, None
        return None

    up = r"depth_pro\.neck\.feature_upsample\."
    rules: list[tuple[str, callable]] = [
        (up + r"image_block\.layers\.0\.(weight|bias)", lambda m: f"encoder.upsample_lowres.{m[1]}"),
        (up + r"scaled_images\.([0-2])\.layers\.(\d+)\.weight",
         lambda m: f"encoder.upsample{_NUM_SCALES - 1 - int(m[1])}.{m[2]}.weight"),
        (up + r"intermediate\.([01])\.layers\.(\d+)\.weight",
         lambda m: f"encoder.upsample_latent{_NUM_HOOKS - 1 - int(m[1])}.{m[2]}.weight"),
        (r"depth_pro\.neck\.fuse_image_with_low_res\.(weight|bias)", lambda m: f"encoder.fuse_lowres.{m[1]}"),
        (r"depth_pro\.neck\.feature_projection\.projections\.([0-4])\.weight",
         lambda m: f"decoder.convs.{_NUM_LEVELS - 1 - int(m[1])}.weight"),
        (r"fusion_stage\.(final|intermediate\.[0-3])\.(.+)", None),
        (r"head\.layers\.(\d+)\.(weight|bias)", lambda m: f"head.{m[1]}.{m[2]}"),
        (r"fov_model\.fov_encoder\.neck\.(weight|bias)", lambda m: f"fov.encoder.1.{m[1]}"),
        (r"fov_model\.conv\.(weight|bias)", lambda m: f"fov.downsample.0.{m[1]}"),
        (r"fov_model\.head\.layers\.(\d+)\.(weight|bias)", lambda m: f"fov.head.{m[1]}.{m[2]}"),
    ]
    for pattern, target in rules:
        m = re.fullmatch(pattern, key)
        if not m:
            continue
        if target is not None:
            return target(m), None
        # fusion stage: name the Apple fusion block, then the part inside it
        level = 0 if m[1] == "final" else _NUM_LEVELS - 1 - int(m[1].split(".")[1])
        block = f"decoder.fusions.{level}."
        inner = m[2]
        m2 = re.fullmatch(r"residual_layer([12])\.convolution([12])\.(weight|bias)", inner)
        if m2:
            return f"{block}resnet{m2[1]}.residual.{2 * int(m2[2]) - 1}.{m2[3]}", None
        if inner == "deconv.weight":
            return block + inner, None
        m2 = re.fullmatch(r"projection\.(weight|bias)", inner)
        if m2:
            return f"{block}out_conv.{m2[1]}", None
        return None
    return None


def _name_list(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def convert_apple_state_dict(state_dict: Mapping[str, torch.Tensor],
                             expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
                             source: str = "depth_pro.pt") -> dict[str, torch.Tensor]:
    """Apple `depth_pro.pt` tensors -> transformers' key names, the fused qkv split in three.

    With `expected_shapes` (transformers key -> shape, e.g. from the model built on the meta device),
    every tensor must land on a key of the model with the right shape and every key of the model must
    be filled; otherwise ModelFileError names the offending tensors. The returned tensors are views
    of the input (no copy).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        targets = apple_key_to_hf(key)
        if targets is None:
            unknown.append(key)
            continue
        if len(targets) == 3:
            if tensor.shape[0] % 3:
                raise ModelFileError(f"{source}: fused attention tensor '{key}' of shape {tuple(tensor.shape)} "
                                     "cannot be split into query, key and value.")
            parts = torch.chunk(tensor, 3, dim=0)
        else:
            parts = (tensor,)
        converted.update(zip(targets, parts))
    if unknown:
        raise ModelFileError(f"{source} is not an Apple Depth Pro checkpoint: {len(unknown)} tensor(s) have no "
                             f"place in Depth Pro: {_name_list(unknown)}.")
    if expected_shapes is not None:
        check_state_dict(converted, expected_shapes, source, key_namer=_apple_name_for)
    return converted


def _apple_name_for(hf_key: str) -> str:
    found = hf_key_to_apple(hf_key)
    return hf_key if found is None else found[0]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]],
                     source: str, key_namer=None) -> None:
    """Every expected key present with its shape and nothing else, or ModelFileError naming the keys
    (in the file's own naming when `key_namer` translates them back)."""
    name = key_namer or (lambda k: k)
    missing = [k for k in expected_shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected_shapes]
    wrong = [k for k in state_dict if k in expected_shapes and tuple(state_dict[k].shape) != tuple(expected_shapes[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_name_list(sorted({name(k) for k in missing}))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_name_list(sorted({name(k) for k in unexpected}))}")
    if wrong:
        detail = [f"{name(k)} {tuple(state_dict[k].shape)} != {tuple(expected_shapes[k])}" for k in wrong[:6]]
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: " + "; ".join(detail)
                        + (" ..." if len(wrong) > 6 else ""))
    if problems:
        raise ModelFileError(f"{source} does not match the Depth Pro architecture: " + "; ".join(problems)
                             + ". Use the released depth_pro.pt or the apple/DepthPro-hf folder unchanged.")


def hf_state_dict_to_apple(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DepthPro tensors -> Apple's `depth_pro.pt` layout (q, k, v fused back into qkv).

    The inverse of `convert_apple_state_dict`; used to write Apple-layout files (tests, exports).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    unknown = []
    for key, tensor in state_dict.items():
        found = hf_key_to_apple(key)
        if found is None:
            unknown.append(key)
            continue
        apple_key, part = found
        if part is None:
            out[apple_key] = tensor
        else:
            fused.setdefault(apple_key, [None, None, None])[part] = tensor
    if unknown:
        raise ModelFileError(f"No Apple Depth Pro counterpart for: {_name_list(unknown)}.")
    for apple_key, parts in fused.items():
        if any(p is None for p in parts):
            raise ModelFileError(f"Cannot fuse '{apple_key}': query, key or value projection missing.")
        out[apple_key] = torch.cat(parts, dim=0)
    return out
