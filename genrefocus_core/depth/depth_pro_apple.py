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

`_RULES` holds this correspondence once; `apple_key_to_hf` and `hf_key_to_apple` read it in the two
directions. transformers names the Dinov2 attention projections in two ways: 5.18 and later
`attention.{q,k,v,o}_proj`, earlier releases `attention.attention.{query,key,value}` and
`attention.output.dense`. The rules are written in the newer naming; `hf_key_to_apple` reads both, and
`align_attention_names` renames a state dict to whichever naming a model instance's own keys use (so
the installed transformers decides, not its version string). The level counts (3 image scales, 2 intermediate hooks, 5 decoder levels) are fixed by Apple's
architecture, whose module names hard-code them; widths and depths follow the tensors, so a smaller
model of the same topology (the tests' tiny one) maps the same way.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from ..basics.errors import ModelFileError

APPLE_TENSOR_COUNT = 1119  # the released depth_pro.pt
HF_TENSOR_COUNT = 1407  # transformers' DepthProForDepthEstimation with the FOV model

_NUM_SCALES = 3  # Apple: upsample0 (full resolution), upsample1 (1/2), upsample2 (1/4)
_NUM_HOOKS = 2  # Apple: upsample_latent0 (block 5), upsample_latent1 (block 11)
_NUM_LEVELS = 5  # decoder levels = hooks + scales


def _reversed_levels(n: int, first: int = 0) -> dict[str, str]:
    """Apple level i -> transformers level n - 1 - i (for i from `first`): the two count in opposite orders."""
    return {str(i): str(n - 1 - i) for i in range(first, n)}


# Field domains: a regular expression (the value is copied) or an {Apple value: transformers value} map.
_DIGITS, _PARAM = r"\d+", "weight|bias"


@dataclass(frozen=True)
class _Rule:
    """One correspondence, read in both directions: templates with {field} placeholders."""

    apple: str
    hf: str
    fields: dict
    fused: bool = False  # Apple's fused qkv <-> transformers' three keys, field {part} = q, k, v

    @cached_property
    def patterns(self) -> tuple[re.Pattern, re.Pattern]:
        return self._pattern(self.apple, 0), self._pattern(self.hf, 1)

    def _pattern(self, template: str, side: int) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", template)
        out = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                out.append(re.escape(part))
                continue
            domain = self.fields[part]
            if isinstance(domain, dict):
                domain = "|".join(re.escape(v) for v in (domain.keys() if side == 0 else domain.values()))
            out.append(f"(?P<{part}>{domain})")
        return re.compile("".join(out))

    def convert(self, key: str, to_hf: bool) -> dict | None:
        """The source key's field values translated for the other side, or None if it does not match."""
        m = self.patterns[0 if to_hf else 1].fullmatch(key)
        if m is None:
            return None
        values = {}
        for name, value in m.groupdict().items():
            domain = self.fields[name]
            if isinstance(domain, dict):
                value = domain[value] if to_hf else {v: k for k, v in domain.items()}[value]
            values[name] = value
        return values


_VIT_PREFIXES = (
    ("encoder.patch_encoder.", "depth_pro.encoder.patch_encoder.model."),
    ("encoder.image_encoder.", "depth_pro.encoder.image_encoder.model."),
    ("fov.encoder.0.", "fov_model.fov_encoder.model."),
)
_VIT_RULES = (  # timm ViT (Apple) <-> Dinov2 (transformers), after the prefixes above
    _Rule("cls_token", "embeddings.cls_token", {}),
    _Rule("pos_embed", "embeddings.position_embeddings", {}),
    _Rule("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}", {"p": _PARAM}),
    _Rule("norm.{p}", "layernorm.{p}", {"p": _PARAM}),
    _Rule("blocks.{n}.attn.qkv.{p}", "encoder.layer.{n}.attention.{part}_proj.{p}",
          {"n": _DIGITS, "p": _PARAM, "part": "q|k|v"}, fused=True),
    _Rule("blocks.{n}.attn.proj.{p}", "encoder.layer.{n}.attention.o_proj.{p}", {"n": _DIGITS, "p": _PARAM}),
    _Rule("blocks.{n}.ls{r}.gamma", "encoder.layer.{n}.layer_scale{r}.lambda1", {"n": _DIGITS, "r": "[12]"}),
    _Rule("blocks.{n}.{m}.{p}", "encoder.layer.{n}.{m}.{p}",
          {"n": _DIGITS, "m": r"norm[12]|mlp\.fc[12]", "p": _PARAM}),
)
_UP = "depth_pro.neck.feature_upsample."
_FUSION_PARTS = (  # inside one decoder fusion block
    ("resnet{r}.residual.{c}.{p}", "residual_layer{r}.convolution{c}.{p}", {"r": "[12]", "c": {"1": "1", "3": "2"},
                                                                             "p": _PARAM}),
    ("deconv.weight", "deconv.weight", {}),
    ("out_conv.{p}", "projection.{p}", {"p": _PARAM}),
)
_RULES = (
    *(_Rule(a + r.apple, h + r.hf, r.fields, r.fused) for a, h in _VIT_PREFIXES for r in _VIT_RULES),
    _Rule("encoder.upsample_lowres.{p}", _UP + "image_block.layers.0.{p}", {"p": _PARAM}),
    _Rule("encoder.upsample{s}.{j}.weight", _UP + "scaled_images.{s}.layers.{j}.weight",
          {"s": _reversed_levels(_NUM_SCALES), "j": _DIGITS}),
    _Rule("encoder.upsample_latent{h}.{j}.weight", _UP + "intermediate.{h}.layers.{j}.weight",
          {"h": _reversed_levels(_NUM_HOOKS), "j": _DIGITS}),
    _Rule("encoder.fuse_lowres.{p}", "depth_pro.neck.fuse_image_with_low_res.{p}", {"p": _PARAM}),
    _Rule("decoder.convs.{l}.weight", "depth_pro.neck.feature_projection.projections.{l}.weight",
          {"l": _reversed_levels(_NUM_LEVELS)}),
    *(_Rule("decoder.fusions.0." + a, "fusion_stage.final." + h, f) for a, h, f in _FUSION_PARTS),
    *(_Rule("decoder.fusions.{l}." + a, "fusion_stage.intermediate.{l}." + h,
            {"l": _reversed_levels(_NUM_LEVELS, first=1), **f}) for a, h, f in _FUSION_PARTS),
    _Rule("head.{j}.{p}", "head.layers.{j}.{p}", {"j": _DIGITS, "p": _PARAM}),
    _Rule("fov.encoder.1.{p}", "fov_model.fov_encoder.neck.{p}", {"p": _PARAM}),
    _Rule("fov.downsample.0.{p}", "fov_model.conv.{p}", {"p": _PARAM}),
    _Rule("fov.head.{j}.{p}", "fov_model.head.layers.{j}.{p}", {"j": _DIGITS, "p": _PARAM}),
)
_QKV_PARTS = ("q", "k", "v")
# (transformers < 5.18, transformers >= 5.18) names of the Dinov2 attention projections
_ATTENTION_NAMINGS = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _newer_attention_name(key: str) -> str:
    """A key in either attention naming -> the naming of `_RULES`."""
    for old, new in _ATTENTION_NAMINGS:
        if old in key:
            return key.replace(old, new)
    return key


def align_attention_names(state: Mapping[str, torch.Tensor], expected: Mapping) -> dict[str, torch.Tensor]:
    """Rename the attention keys of `state` to the naming of `expected` (a model's own state-dict keys);
    keys already expected, and keys with no counterpart there, stay as they are (the shape check names them)."""
    out = {}
    for key, value in state.items():
        if key not in expected:
            for old, new in _ATTENTION_NAMINGS:
                renamed = next((key.replace(a, b) for a, b in ((old, new), (new, old))
                                if a in key and key.replace(a, b) in expected), None)
                if renamed is not None:
                    key = renamed
                    break
        out[key] = value
    return out


def apple_key_to_hf(key: str) -> list[str] | None:
    """One Apple key -> its transformers key(s) in the naming of transformers >= 5.18 (three for a fused
    qkv, in q, k, v order), or None for a key that has no place in the model."""
    for rule in _RULES:
        values = rule.convert(key, to_hf=True)
        if values is not None:
            if rule.fused:
                return [rule.hf.format(**values, part=part) for part in _QKV_PARTS]
            return [rule.hf.format(**values)]
    return None


def hf_key_to_apple(key: str) -> tuple[str, int | None] | None:
    """One transformers key (either attention naming) -> (Apple key, part) where part is 0/1/2 for q/k/v
    of a fused qkv and None otherwise; None for a key with no Apple counterpart."""
    key = _newer_attention_name(key)
    for rule in _RULES:
        values = rule.convert(key, to_hf=False)
        if values is not None:
            part = values.pop("part", None)
            return rule.apple.format(**values), None if part is None else _QKV_PARTS.index(part)
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
    the keys take that model's attention naming, every tensor must land on a key of the model with the
    right shape and every key of the model must be filled; otherwise ModelFileError names the offending
    tensors. Without it the keys are in the naming of transformers >= 5.18. The returned tensors are
    views of the input (no copy).
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
        converted = align_attention_names(converted, expected_shapes)
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
