"""The OminiControl-style multi-branch forward of FLUX used by GenRefocus, written once for every
module layout: it reaches the model's layers through a layout adapter (`flux_layouts`: diffusers'
FluxTransformer2DModel, or BFL's layout as in ComfyUI's own FLUX), never through a fork of the model.

Branches, in this order: text, image (the noisy latents), condition 1..n. Rules (spec
"Condition tokens"):
- text and image run the base weights; every condition branch runs base + LoRA at scale exactly 1
  (LoRA deltas are only ever computed for condition tokens);
- text and image use the embedding of (t, guidance, pooled); conditions use (0, 1, pooled);
- double blocks: per-branch AdaLN modulation; single blocks: per-branch norm, gate and MLP;
- attention: text and image queries see every branch; condition i sees text, image and itself.

How it is computed (identical results, less work than branch-by-branch):
- text and image share one modulation, so they form one "main" sequence where possible; all
  conditions share one embedding (per LoRA adapter set), and are kept as [N, n, Lc, dim];
- every linear layer is called once per block on the concatenation of the branches that use it;
  the LoRA delta is added to the condition slice only;
- main queries attend over all keys in one SDPA call; condition queries are batched over the
  conditions against [text, image, own] keys (one SDPA call); with one condition both are one call;
- constants of a sampling run (text embedding, condition embeddings, their timestep embedding,
  rotary embeddings) are computed once by `RunConstants` / `rotary_embedding`;
- the last single block only computes what the output uses: image queries, MLP and projection
  (text and condition tokens give only keys and values there).
Modules are always called (never their weights read), so offload, fp8 and ComfyUI's ops apply.
Functions taking `transformer` accept a layout adapter or a diffusers FluxTransformer2DModel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flux_layouts import Segment, apply_rope, layout_of, rope_tables



def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def _adapter_groups(cond_adapters: list[tuple[str, ...]]):
    """Distinct adapter sets in first-seen order and, per condition, the index of its set."""
    groups: list[tuple[str, ...]] = []
    index = []
    for adapters in cond_adapters:
        if adapters not in groups:
            groups.append(adapters)
        index.append(groups.index(adapters))
    return groups, index


def _cond_segments(offset: int, cond_len: int, cond_adapters: list[tuple[str, ...]]) -> list[Segment]:
    """Segments for conditions laid out one after another from `offset`, merging neighbours
    that use the same adapters."""
    segments: list[Segment] = []
    for i, adapters in enumerate(cond_adapters):
        start, stop = offset + i * cond_len, offset + (i + 1) * cond_len
        if segments and segments[-1][2] == adapters and segments[-1][1] == start:
            segments[-1] = (segments[-1][0], stop, adapters)
        elif adapters:
            segments.append((start, stop, adapters))
    return segments


@dataclass
class BranchConstants:
    """The branch inputs that do not change between denoising steps, for a batch of N sequences.

    text_hidden [N, T, dim] (context_embedder output); pooled [N, P];
    cond_hidden [N, n, Lc, dim] (x_embedder + LoRA of the condition tokens) or None;
    cond_temb [N, dim] (embedding of timestep 0, guidance 1, pooled); cond_adapters: n tuples.
    """

    text_hidden: torch.Tensor
    pooled: torch.Tensor
    cond_hidden: torch.Tensor | None
    cond_temb: torch.Tensor | None
    cond_adapters: list[tuple[str, ...]]

    @property
    def n_conditions(self) -> int:
        return 0 if self.cond_hidden is None else self.cond_hidden.shape[1]


@dataclass
class RunConstants:
    """What stays fixed during a sampling run of B images: the embedded text, the embedded
    conditions (each [B, Lc_i, dim], lengths may differ) and the conditions' time embedding.
    `whole()` gives the forward's inputs for whole images, `tiles()` for a batch of tiles."""

    text_hidden: torch.Tensor
    pooled: torch.Tensor
    cond_embedded: list[torch.Tensor]
    cond_temb: torch.Tensor | None
    cond_adapters: list[tuple[str, ...]]

    def whole(self) -> BranchConstants:
        cond = None
        if self.cond_embedded:
            lengths = {c.shape[1] for c in self.cond_embedded}
            if len(lengths) != 1:
                raise ValueError(f"Untiled conditions must all have the image's token count, got {sorted(lengths)}.")
            cond = torch.stack(self.cond_embedded, dim=1)
        return BranchConstants(self.text_hidden, self.pooled, cond, self.cond_temb, self.cond_adapters)

    def tiles(self, tile_indices: list[torch.Tensor], spatial: list[bool]) -> BranchConstants:
        """Inputs for len(tile_indices) tiles of every image, batched tile-major ([tiles * B, ...]).

        A spatial condition is cut to the tile's token indices [Lt]; a non-spatial one (an
        exemplar such as the aperture shape) is given whole to every tile and must have Lt tokens."""
        k = len(tile_indices)
        cond = None
        if self.cond_embedded:
            per_tile = []
            for idx in tile_indices:
                parts = [c[:, idx] if sp else c for c, sp in zip(self.cond_embedded, spatial)]
                lengths = {p.shape[1] for p in parts}
                if len(lengths) != 1:
                    raise ValueError(f"A non-spatial condition must have one tile's token count ({idx.numel()}), "
                                     f"got {sorted(lengths)}.")
                per_tile.append(torch.stack(parts, dim=1))
            cond = torch.cat(per_tile, dim=0)
        return BranchConstants(
            self.text_hidden.repeat(k, 1, 1),
            self.pooled.repeat(k, 1),
            cond,
            None if self.cond_temb is None else self.cond_temb.repeat(k, 1),
            self.cond_adapters,
        )


def _time_embedding(layout, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Embedding of (t, guidance, pooled); timestep and guidance in the reference's units (t/1000 and
    the guidance scale), multiplied by 1000 in the compute dtype as the reference does."""
    timestep = timestep.to(dtype) * 1000
    if guidance is None or not layout.has_guidance:
        return layout.time_embedding(timestep, None, pooled)
    return layout.time_embedding(timestep, guidance.to(dtype) * 1000, pooled)


def prepare_constants(transformer, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                      cond_tokens: list[torch.Tensor], cond_adapters: list[tuple[str, ...]],
                      dtype: torch.dtype) -> RunConstants:
    """Embed the text [B, T, Dt] and each condition's tokens [B, Lc_i, 64] once per run."""
    layout = layout_of(transformer)
    B = pooled.shape[0]
    device = pooled.device
    text_hidden = layout.embed_text(prompt_embeds.to(dtype))
    pooled = pooled.to(dtype)
    if not cond_tokens:
        return RunConstants(text_hidden, pooled, [], None, [])
    embedded = []
    for tokens, adapters in zip(cond_tokens, cond_adapters):
        embedded.append(layout.embed_latents(tokens.to(dtype), [(0, tokens.shape[1], tuple(adapters))]))
    zeros = torch.zeros(B, device=device)
    ones = torch.ones(B, device=device)
    cond_temb = _time_embedding(layout, zeros, ones, pooled, dtype)
    return RunConstants(text_hidden, pooled, embedded, cond_temb, [tuple(a) for a in cond_adapters])


def rotary_embedding(transformer, text_ids: torch.Tensor, image_ids: torch.Tensor,
                     cond_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T + L + n*Lc, head_dim] for the sequence [text, image, cond_1..n]."""
    layout = layout_of(transformer)
    return rope_tables(torch.cat([text_ids, image_ids, *cond_ids], dim=0), layout.theta, layout.axes_dim)


def _branch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, main_len: int, n: int,
                      attention) -> torch.Tensor:
    """q, k, v [N, H, S, D] with S = main_len + n*Lc -> [N, S, H*D].

    Main tokens (text + image) attend to everything; condition i attends to main + itself."""
    if n <= 1:
        return attention(q, k, v)
    N, H, S, D = q.shape
    Lc = (S - main_len) // n
    out_main = attention(q[:, :, :main_len], k, v)

    def per_cond(x):  # [N, H, n*Lc, D] -> [N, n, H, Lc, D]
        return x[:, :, main_len:].unflatten(2, (n, Lc)).transpose(1, 2)

    def with_main(x):  # keys/values of condition i: [main, own] -> [N*n, H, main_len + Lc, D]
        main = x[:, :, :main_len].unsqueeze(1).expand(N, n, H, main_len, D)
        return torch.cat([main, per_cond(x)], dim=3).flatten(0, 1)

    qc = per_cond(q).flatten(0, 1)
    out_c = attention(qc, with_main(k), with_main(v))  # [N*n, Lc, H*D]
    return torch.cat([out_main, out_c.unflatten(0, (N, n)).flatten(1, 2)], dim=1)


def _heads(layout, *xs):
    return tuple(x.unflatten(-1, (-1, layout.head_dim)) for x in xs)


def _attend(layout, parts, rope, main_len: int, n: int) -> torch.Tensor:
    """Rotary embedding, then multi-branch attention -> [N, S, H*D]. `parts`: (q, k, v) [N, S_i, H, D] of
    consecutive pieces of the sequence (text, then the rest), written straight into [N, H, S, D] buffers
    (contiguous: CPU SDPA kernels run ~10% faster than on transposed views; no concatenation copies)."""
    cos, sin = rope
    first = parts[0][0]
    N, _, H, D = first.shape
    S = sum(q.shape[1] for q, _, _ in parts)
    q_all, k_all, v_all = (first.new_empty(N, H, S, D) for _ in range(3))
    start = 0
    for q, k, v in parts:
        stop = start + q.shape[1]
        apply_rope(q, cos[start:stop], sin[start:stop], out=q_all[:, :, start:stop].transpose(1, 2))
        apply_rope(k, cos[start:stop], sin[start:stop], out=k_all[:, :, start:stop].transpose(1, 2))
        v_all[:, :, start:stop].transpose(1, 2).copy_(v)
        start = stop
    return _branch_attention(q_all, k_all, v_all, main_len, n, layout.attention).to(first.dtype)


def _double_attention(layout, block, x, txt, segments, rope, main_len: int, n: int):
    """Double-block attention: x [N, S, dim] = [image, conds] through the image projections (LoRA on
    the condition segments), txt [N, T, dim] through the text projections.
    Returns the attention outputs before the output projections: (x-part [N, S, inner], text-part)."""
    q, k, v = _heads(layout, *layout.double_qkv(block, "img", x, segments))
    q, k = layout.double_qk_norm(block, "img", q, k)
    tq, tk, tv = _heads(layout, *layout.double_qkv(block, "txt", txt, []))
    tq, tk = layout.double_qk_norm(block, "txt", tq, tk)
    T = txt.shape[1]
    out = _attend(layout, [(tq, tk, tv), (q, k, v)], rope, main_len, n)
    return out[:, T:], out[:, :T]


def _modulations(mod_linear, main_temb: torch.Tensor, cond_temb: torch.Tensor | None, groups, group_index, chunks: int):
    """AdaLN parameters: main [chunks x [N, dim]] from the base weights, and per condition
    [chunks x [N, n, dim]] from the condition embedding with the condition's LoRA adapters.
    mod_linear(emb, segments) is the layout's modulation layer (SiLU included)."""
    rows = [main_temb[:, None]]
    if cond_temb is not None:
        rows += [cond_temb[:, None]] * len(groups)
    segments = [(1 + g, 2 + g, adapters) for g, adapters in enumerate(groups) if adapters] if cond_temb is not None else []
    emb = mod_linear(torch.cat(rows, dim=1), segments)  # [N, 1 + G, chunks*dim]
    main = emb[:, 0].chunk(chunks, dim=-1)
    if cond_temb is None:
        return main, None
    per_cond = emb[:, [1 + g for g in group_index]].chunk(chunks, dim=-1)  # [N, n, dim] each
    return main, per_cond


def _modulate(x, shift, scale, out=None):
    """x * (1 + scale) + shift in one pass (optionally written into `out`, a slice of the
    concatenated branch sequence, which saves a concatenation). shift/scale broadcast to x."""
    return torch.addcmul(shift, x, 1 + scale, out=out)


def _main_mod(t):  # [N, dim] -> [N, 1, dim]
    return t[:, None]


def _cond_mod(t):  # [N, n, dim] -> [N, n, 1, dim]
    return t[:, :, None]


def _double_block(layout, block, img, txt, cond, temb, cst: BranchConstants, groups, group_index, rope):
    N, L, dim = img.shape
    n = 0 if cond is None else cond.shape[1]
    Lc = 0 if cond is None else cond.shape[2]
    segments = _cond_segments(L, Lc, cst.cond_adapters)

    t_shift_msa, t_scale_msa, t_gate_msa, t_shift_mlp, t_scale_mlp, t_gate_mlp = \
        layout.double_modulation(block, "txt", temb, []).chunk(6, dim=1)
    txt_norm = layout.double_norm(block, "txt1", txt) * (1 + t_scale_msa[:, None]) + t_shift_msa[:, None]
    main_mod, cond_mod = _modulations(lambda e, s: layout.double_modulation(block, "img", e, s),
                                      temb, cst.cond_temb, groups, group_index, 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (_main_mod(m) for m in main_mod)
    if n:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (_cond_mod(m) for m in cond_mod)

    # [image, conditions] as one sequence, modulated per branch
    x = img.new_empty(N, L + n * Lc, dim)
    _modulate(layout.double_norm(block, "img1", img), shift_msa, scale_msa, out=x[:, :L])
    if n:
        _modulate(layout.double_norm(block, "img1", cond), c_shift_msa, c_scale_msa, out=x[:, L:].unflatten(1, (n, Lc)))

    attn_out, txt_attn = _double_attention(layout, block, x, txt_norm, segments, rope, txt.shape[1] + L, n)
    attn_out = layout.double_out(block, "img", attn_out.contiguous(), segments)
    txt_attn = layout.double_out(block, "txt", txt_attn.contiguous(), [])

    # text branch (base weights only)
    txt = torch.addcmul(txt, txt_attn, t_gate_msa.unsqueeze(1))
    txt_ff = layout.double_mlp(block, "txt", _modulate(layout.double_norm(block, "txt2", txt), t_shift_mlp[:, None],
                                                       t_scale_mlp[:, None]), [])
    txt = _clip_fp16(torch.addcmul(txt, txt_ff, t_gate_mlp.unsqueeze(1)))

    # image and condition branches
    img = torch.addcmul(img, attn_out[:, :L], gate_msa)
    h = x  # reuse the buffer: the attention input is no longer needed
    _modulate(layout.double_norm(block, "img2", img), shift_mlp, scale_mlp, out=h[:, :L])
    if n:
        cond = torch.addcmul(cond, attn_out[:, L:].unflatten(1, (n, Lc)), c_gate_msa)
        _modulate(layout.double_norm(block, "img2", cond), c_shift_mlp, c_scale_mlp, out=h[:, L:].unflatten(1, (n, Lc)))
    ff_out = layout.double_mlp(block, "img", h, segments)
    img = _clip_fp16(torch.addcmul(img, ff_out[:, :L], gate_mlp))
    if n:
        cond = _clip_fp16(torch.addcmul(cond, ff_out[:, L:].unflatten(1, (n, Lc)), c_gate_mlp))
    return img, txt, cond


def _single_block_input(layout, block, main, cond, temb, cst: BranchConstants, groups, group_index):
    """AdaLN-modulated input of a single block for all branches, written into one sequence
    [N, M + n*Lc, dim]; also the gates (main, conditions) and the LoRA segments."""
    N, M, dim = main.shape
    n = 0 if cond is None else cond.shape[1]
    Lc = 0 if cond is None else cond.shape[2]
    main_mod, cond_mod = _modulations(lambda e, s: layout.single_modulation(block, e, s),
                                      temb, cst.cond_temb, groups, group_index, 3)
    shift, scale, gate = (_main_mod(m) for m in main_mod)
    x = main.new_empty(N, M + n * Lc, dim)
    _modulate(layout.single_norm(block, main), shift, scale, out=x[:, :M])
    c_gate = None
    if n:
        c_shift, c_scale, c_gate = (_cond_mod(m) for m in cond_mod)
        _modulate(layout.single_norm(block, cond), c_shift, c_scale, out=x[:, M:].unflatten(1, (n, Lc)))
    return x, gate, c_gate, _cond_segments(M, Lc, cst.cond_adapters)


def _single_block(layout, block, main, cond, temb, cst: BranchConstants, groups, group_index, rope):
    """main [N, T+L, dim] (text and image share base weights and embedding), cond [N, n, Lc, dim]."""
    M = main.shape[1]
    n = 0 if cond is None else cond.shape[1]
    Lc = 0 if cond is None else cond.shape[2]
    x, gate, c_gate, segments = _single_block_input(layout, block, main, cond, temb, cst, groups, group_index)
    q, k, v, mlp = layout.single_qkv_mlp(block, x, segments)
    mlp = layout.single_mlp_act(block, mlp)
    q, k, v = _heads(layout, q, k, v)
    q, k = layout.single_qk_norm(block, q, k)
    attn_out = _attend(layout, [(q, k, v)], rope, M, n)
    out = layout.single_out(block, torch.cat([attn_out, mlp], dim=2), segments)
    main = _clip_fp16(torch.addcmul(main, out[:, :M], gate))
    if n:
        cond = _clip_fp16(torch.addcmul(cond, out[:, M:].unflatten(1, (n, Lc)), c_gate))
    return main, cond


def _last_single_block(layout, block, main, cond, temb, cst: BranchConstants, groups, group_index, rope, T: int):
    """The last single block, computed for the image branch only: after it only the image tokens are
    used (the final layer), so text and condition tokens contribute just their keys and values.
    Same result as `_single_block` for the image tokens, with (where the layout allows) no queries,
    MLP or output projection for the others."""
    M = main.shape[1]
    x, gate, _, segments = _single_block_input(layout, block, main, cond, temb, cst, groups, group_index)
    q, k, v, mlp = layout.single_qkv_mlp(block, x, segments, query_rows=slice(T, M))
    mlp = layout.single_mlp_act(block, mlp)
    q, k, v = _heads(layout, q, k, v)
    q, k = layout.single_qk_norm(block, q, k)
    cos, sin = rope
    q = apply_rope(q, cos[T:M], sin[T:M])
    k = apply_rope(k, cos, sin)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    # image queries attend to every branch
    attn_out = layout.attention(q, k, v).to(x.dtype)
    out = layout.single_out(block, torch.cat([attn_out, mlp], dim=2), [])
    return _clip_fp16(torch.addcmul(main[:, T:M], out, gate))


def multi_branch_forward(transformer, latents: torch.Tensor, timestep: torch.Tensor,
                         guidance: torch.Tensor | None, constants: BranchConstants,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Noise prediction [N, L, 64] for packed latents [N, L, 64].

    transformer: a layout adapter (`flux_layouts`) or a diffusers FluxTransformer2DModel;
    timestep [N] is sigma (t / 1000), guidance [N] the guidance scale (None for models without a
    guidance embedding); `constants` from `RunConstants.whole()` or `.tiles()` (batch N);
    `rope` from `rotary_embedding` for [text, image, conditions].
    """
    layout = layout_of(transformer)
    dtype = constants.text_hidden.dtype
    groups, group_index = _adapter_groups(constants.cond_adapters)
    img = layout.embed_latents(latents.to(dtype), [])
    temb = _time_embedding(layout, timestep, guidance, constants.pooled, dtype)
    txt = constants.text_hidden
    cond = constants.cond_hidden
    T = txt.shape[1]
    for block in layout.double_blocks:
        img, txt, cond = _double_block(layout, block, img, txt, cond, temb, constants, groups, group_index, rope)
    main = torch.cat([txt, img], dim=1)
    single_blocks = layout.single_blocks
    if not single_blocks:
        return layout.final(img, temb)
    for block in single_blocks[:-1]:
        main, cond = _single_block(layout, block, main, cond, temb, constants, groups, group_index, rope)
    img = _last_single_block(layout, block=single_blocks[-1], main=main, cond=cond, temb=temb, cst=constants,
                             groups=groups, group_index=group_index, rope=rope, T=T)
    return layout.final(img, temb)
