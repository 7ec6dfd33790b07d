"""Layout adapters: how the multi-branch forward reaches the layers of a FLUX transformer.

`multi_branch_forward` holds the GenRefocus algorithm once; it asks a layout adapter for each
projection by its role (image q/k/v, modulation, MLP, ...). Two module families exist:

- `DiffusersLayout`: diffusers' FluxTransformer2DModel (the standalone core and CLI), LoRA as peft
  adapters on separate to_q/to_k/to_v/proj_mlp layers;
- `BflLayout`: Black Forest Labs' layout, as ComfyUI's `comfy.ldm.flux.model.Flux` has it (fused
  `img_attn.qkv`, single-block `linear1` = q|k|v|mlp-in and `linear2`, `img_mod.lin`, `modulation.lin`,
  ...). It works on any object with those attribute names and never imports ComfyUI. The LoRA lives
  outside the model (`lora_slices.LoraSlices`) and is added as low-rank deltas on the matching output
  rows of the fused layers, for condition tokens only, so the base weights are never touched.

Both adapters only ever *call* the model's modules (never read their weights), so ComfyUI's ops
(fp8, scaled fp8, GGUF dequantisation, lowvram casting), the core's fp8 storage and offload hooks
all apply unchanged.

A `Segment` (start, stop, adapters) says which tokens along dim -2 get which LoRA adapters.
Each adapter's `attention(q, k, v)` ([N, H, S, D] -> [N, S, H*D]) is torch's SDPA unless a front end sets
another one (the ComfyUI nodes give ComfyUI's optimized attention on GPUs: its sage/flash/xformers choice).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Segment = tuple[int, int, tuple[str, ...]]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of q, k, v [N, H, S, D] -> [N, S, H*D] with torch's SDPA (a layout's default)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2, 3)
TIMESTEP_CHANNELS = 256  # FLUX's sinusoidal embedding width for timestep and guidance


def rope_tables(ids: torch.Tensor, theta: float, axes_dim) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (cos, sin) [S, head_dim] for position ids [S, n_axes], each frequency repeated for
    its (even, odd) channel pair; frequencies in float64 as FLUX's reference code computes them."""
    pos = ids.float()
    f64 = torch.float64 if ids.device.type not in ("mps", "npu") else torch.float32
    cos_out, sin_out = [], []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device)[: dim // 2] / dim))
        angles = torch.outer(pos[:, i], freqs)
        cos_out.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_out.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [N, S, H, D] by the tables [S, D] (computed in float32);
    `out` (any strides, e.g. a slice of a [N, H, S, D] buffer seen as [N, S, H, D]) receives the result."""
    cos, sin = cos[None, :, None], sin[None, :, None]
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    if out is None:
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)
    if x.dtype == torch.float32 and out.dtype == torch.float32:  # the same two products and sum, written in place
        torch.mul(x, cos, out=out)
        return out.add_(rotated * sin)
    return out.copy_(x.float() * cos + rotated.float() * sin)


def timestep_features(t: torch.Tensor, channels: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [N, channels] = [cos, sin] of t [N] (already scaled by 1000), float32."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ------------------------------------------------------------------------------------------------ diffusers

def _is_peft_layer(module) -> bool:
    from .lora import is_lora_layer
    return is_lora_layer(module)


def sequence_rows(x: torch.Tensor, y: torch.Tensor, start: int, stop: int):
    """Tokens start:stop of a layer's input x [..., S, in] and output y [..., S, out], as one 2-D
    (x rows, y rows) pair per sequence: a 3-D slice of the token axis is not contiguous, and torch
    runs a linear layer on it through bmm with a copy (the 2-D matmul on the same rows needs neither)."""
    x3, y3 = x.reshape(-1, *x.shape[-2:]), y.view(-1, *y.shape[-2:])
    return zip(x3[:, start:stop], y3[:, start:stop])


def lora_linear(module: torch.nn.Module, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
    """A peft-wrapped linear layer: base projection of all of `x` [..., S, in] plus, for each segment,
    the LoRA delta `lora_B(lora_A(x))` of each listed adapter at scale 1."""
    if not _is_peft_layer(module):
        return module(x)
    y = module.get_base_layer()(x)
    for start, stop, adapters in segments:
        for name in adapters:
            if name not in module.lora_A:
                continue
            for xs, ys in sequence_rows(x, y, start, stop):
                ys += module.lora_B[name](module.lora_A[name](module.lora_dropout[name](xs))).to(y.dtype)
    return y


class DiffusersLayout:
    """diffusers FluxTransformer2DModel (LoRA as peft adapters, `lora.load_lora`)."""

    def __init__(self, transformer):
        self.model = transformer
        self.double_blocks = list(transformer.transformer_blocks)
        self.single_blocks = list(transformer.single_transformer_blocks)
        self.head_dim = transformer.config.attention_head_dim
        self.has_guidance = bool(transformer.config.guidance_embeds)
        self.theta, self.axes_dim = transformer.pos_embed.theta, transformer.pos_embed.axes_dim
        self.attention = sdpa

    def linear(self, module, x, segments):
        return lora_linear(module, x, segments)

    def embed_latents(self, x, segments):
        return self.linear(self.model.x_embedder, x, segments)

    def embed_text(self, x):
        return self.model.context_embedder(x)

    def time_embedding(self, t, guidance, pooled):
        """t, guidance [N] already scaled by 1000, in the compute dtype (None: no guidance)."""
        if guidance is None:
            return self.model.time_text_embed(t, pooled)
        return self.model.time_text_embed(t, guidance, pooled)

    def final(self, img, temb):
        return self.model.proj_out(self.model.norm_out(img, temb))

    # double blocks
    def double_modulation(self, block, stream, emb, segments):
        norm = block.norm1 if stream == "img" else block.norm1_context
        return self.linear(norm.linear, F.silu(emb), segments)

    def double_norm(self, block, which, x):
        return {"img1": block.norm1.norm, "img2": block.norm2, "txt1": block.norm1_context.norm,
                "txt2": block.norm2_context}[which](x)

    def double_qkv(self, block, stream, x, segments):
        a = block.attn
        if stream == "img":
            return tuple(self.linear(m, x, segments) for m in (a.to_q, a.to_k, a.to_v))
        return a.add_q_proj(x), a.add_k_proj(x), a.add_v_proj(x)

    def double_qk_norm(self, block, stream, q, k):
        a = block.attn
        return (a.norm_q(q), a.norm_k(k)) if stream == "img" else (a.norm_added_q(q), a.norm_added_k(k))

    def double_out(self, block, stream, x, segments):
        if stream == "img":
            return block.attn.to_out[1](self.linear(block.attn.to_out[0], x, segments))
        return block.attn.to_add_out(x)

    def double_mlp(self, block, stream, x, segments):
        ff = block.ff if stream == "img" else block.ff_context
        for module in ff.net:
            x = self.linear(module, x, segments) if _is_peft_layer(module) else module(x)
        return x

    # single blocks
    def single_modulation(self, block, emb, segments):
        return self.linear(block.norm.linear, F.silu(emb), segments)

    def single_norm(self, block, x):
        return block.norm.norm(x)

    def single_qkv_mlp(self, block, x, segments, query_rows: slice | None = None):
        """(q, k, v, mlp-in) of x [N, S, dim]; with query_rows only those rows get q and mlp-in
        (their segments must be empty: the last block's image tokens)."""
        a = block.attn
        k = self.linear(a.to_k, x, segments)
        v = self.linear(a.to_v, x, segments)
        xq, seg_q = (x, segments) if query_rows is None else (x[:, query_rows], [])
        return self.linear(a.to_q, xq, seg_q), k, v, self.linear(block.proj_mlp, xq, seg_q)

    def single_qk_norm(self, block, q, k):
        return block.attn.norm_q(q), block.attn.norm_k(k)

    def single_mlp_act(self, block, h):
        return block.act_mlp(h)

    def single_out(self, block, x, segments):
        return self.linear(block.proj_out, x, segments)


# ------------------------------------------------------------------------------------------------ BFL

class BflLayout:
    """Black Forest Labs' FLUX layout (ComfyUI's Flux and anything with the same attribute names).

    model: the diffusion model (`img_in`, `time_in`, `vector_in`, `guidance_in`, `txt_in`,
    `pe_embedder` with `theta`/`axes_dim`, `double_blocks`, `single_blocks`, `final_layer`,
    `hidden_size`, `num_heads`); lora: a `lora_slices.LoraSlices` (or None) holding the adapters
    by BFL module path, on the device and dtype the forward runs in.
    """

    def __init__(self, model, lora=None):
        self.model = model
        self.lora = lora
        self.double_blocks = list(model.double_blocks)
        self.single_blocks = list(model.single_blocks)
        self.head_dim = model.hidden_size // model.num_heads
        guidance_in = getattr(model, "guidance_in", None)
        self.has_guidance = isinstance(guidance_in, torch.nn.Module) and not isinstance(guidance_in, torch.nn.Identity)
        self.theta, self.axes_dim = model.pe_embedder.theta, model.pe_embedder.axes_dim
        self._paths = {id(m): name for name, m in model.named_modules()}
        self.attention = sdpa

    def linear(self, module, x, segments):
        y = module(x)
        if self.lora is not None and segments:
            self.lora.add_deltas(self._paths.get(id(module)), x, y, segments)
        return y

    def embed_latents(self, x, segments):
        return self.linear(self.model.img_in, x, segments)

    def embed_text(self, x):
        return self.model.txt_in(x)

    def time_embedding(self, t, guidance, pooled):
        dtype = pooled.dtype
        emb = self.model.time_in(timestep_features(t).to(dtype))
        if guidance is not None:
            emb = emb + self.model.guidance_in(timestep_features(guidance).to(dtype))
        return emb + self.model.vector_in(pooled)

    def final(self, img, temb):
        last = self.model.final_layer
        shift, scale = last.adaLN_modulation(temb[:, None]).chunk(2, dim=-1)
        return last.linear(torch.addcmul(shift, last.norm_final(img), 1 + scale))

    @staticmethod
    def _split(y, parts):
        return y.split(parts, dim=-1)

    # double blocks
    def double_modulation(self, block, stream, emb, segments):
        mod = block.img_mod if stream == "img" else block.txt_mod
        return self.linear(mod.lin, F.silu(emb), segments if stream == "img" else [])

    def double_norm(self, block, which, x):
        return {"img1": block.img_norm1, "img2": block.img_norm2, "txt1": block.txt_norm1,
                "txt2": block.txt_norm2}[which](x)

    def double_qkv(self, block, stream, x, segments):
        attn = block.img_attn if stream == "img" else block.txt_attn
        return attn.qkv(x).chunk(3, dim=-1) if stream != "img" else self.linear(attn.qkv, x, segments).chunk(3, dim=-1)

    def double_qk_norm(self, block, stream, q, k):
        norm = (block.img_attn if stream == "img" else block.txt_attn).norm
        return norm.query_norm(q).to(q.dtype), norm.key_norm(k).to(k.dtype)

    def double_out(self, block, stream, x, segments):
        if stream == "img":
            return self.linear(block.img_attn.proj, x, segments)
        return block.txt_attn.proj(x)

    def double_mlp(self, block, stream, x, segments):
        mlp = block.img_mlp if stream == "img" else block.txt_mlp
        if stream != "img":
            return mlp(x)
        return self.linear(mlp[2], mlp[1](self.linear(mlp[0], x, segments)), segments)

    # single blocks
    def single_modulation(self, block, emb, segments):
        return self.linear(block.modulation.lin, F.silu(emb), segments)

    def single_norm(self, block, x):
        return block.pre_norm(x)

    def single_qkv_mlp(self, block, x, segments, query_rows: slice | None = None):
        """(q, k, v, mlp-in) from one call of the fused linear1 (q|k|v|mlp-in); with query_rows, q and
        mlp-in of those rows only (the layer is still called once on every row)."""
        dim = self.model.hidden_size
        q, k, v, mlp = self.linear(block.linear1, x, segments).split([dim, dim, dim, block.mlp_hidden_dim], dim=-1)
        if query_rows is not None:
            q, mlp = q[:, query_rows], mlp[:, query_rows]
        return q, k, v, mlp

    def single_qk_norm(self, block, q, k):
        return block.norm.query_norm(q).to(q.dtype), block.norm.key_norm(k).to(k.dtype)

    def single_mlp_act(self, block, h):
        return block.mlp_act(h)

    def single_out(self, block, x, segments):
        return self.linear(block.linear2, x, segments)


def layout_of(model, lora=None):
    """The adapter for `model`: a layout adapter as is, else by the model's attribute names."""
    if isinstance(model, (DiffusersLayout, BflLayout)):
        return model
    if hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks"):
        return DiffusersLayout(model)
    if hasattr(model, "double_blocks") and hasattr(model, "single_blocks"):
        return BflLayout(model, lora)
    raise TypeError(f"{type(model).__name__} is not a FLUX transformer (neither diffusers' nor BFL's layout).")
