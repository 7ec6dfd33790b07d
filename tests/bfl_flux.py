"""A BFL-layout FLUX made of plain torch modules (the attribute names of ComfyUI's
comfy.ldm.flux.model.Flux), loaded from the shared tiny weights, to test `flux_layouts.BflLayout`
without ComfyUI. The math of each small module is FLUX's own (RMS norm with eps 1e-6 and a learned
scale, torch's fused kernel as ComfyUI calls it, LayerNorm without affine, tanh GELU)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flux_files import tiny_bfl_transformer


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # torch's fused RMS norm, as ComfyUI's comfy.rmsnorm calls it
        return torch.nn.functional.rms_norm(x, self.scale.shape, weight=self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, k):
        super().__init__()
        self.lin = nn.Linear(dim, k * dim)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.in_layer, self.silu, self.out_layer = nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


def _norm(dim):
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, 6))
            setattr(self, f"{s}_norm1", _norm(dim))
            setattr(self, f"{s}_attn", SelfAttention(dim, heads))
            setattr(self, f"{s}_norm2", _norm(dim))
            setattr(self, f"{s}_mlp", _mlp(dim, 4 * dim))


class SingleStreamBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.mlp_hidden_dim = heads, 4 * dim
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = _norm(dim)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, 3)


class LastLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = _norm(dim)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


class PosEmbed(nn.Module):
    def __init__(self, theta, axes_dim):
        super().__init__()
        self.theta, self.axes_dim = theta, list(axes_dim)


class BflFlux(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        dim = heads * head_dim
        self.hidden_size, self.num_heads = dim, heads
        channels = config["in_channels"]
        self.pe_embedder = PosEmbed(10000, config["axes_dims_rope"])
        self.img_in = nn.Linear(channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config["pooled_projection_dim"], dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.get("guidance_embeds", True) else nn.Identity()
        self.txt_in = nn.Linear(config["joint_attention_dim"], dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads) for _ in range(config["num_layers"]))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, heads) for _ in range(config["num_single_layers"]))
        self.final_layer = LastLayer(dim, config.get("out_channels") or channels)


def build_tiny_bfl(tiny_dir: Path) -> BflFlux:
    config = json.loads((Path(tiny_dir) / "configs.json").read_text())["transformer"]
    model = BflFlux(config)
    model.load_state_dict(tiny_bfl_transformer(tiny_dir), strict=True)
    return model.eval().requires_grad_(False)
