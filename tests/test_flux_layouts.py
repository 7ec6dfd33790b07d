"""The multi-branch forward on BFL's module layout (ComfyUI's FLUX) equals the diffusers one.

The tiny weights are converted to BFL's layout (fused qkv, linear1/linear2, ...) into plain torch
modules with ComfyUI's attribute names (tests/bfl_flux.py), the LoRA files are applied as low-rank
deltas on output slices of the fused layers (lora_slices). Tolerances: both layouts run the same fp32
algorithm, differing only in how GEMMs are blocked (one fused [3D or 7D]-row GEMM versus separate
ones) and in the RMS-norm formula, i.e. relative rounding differences of a few 1e-7 per operation
through 4 blocks and 4 steps; 1e-4 absolute (the fixtures' contract) on values of magnitude ~1-5
leaves a wide margin while the known mistakes (LoRA on every branch, LoRA off) are >= 0.2.
"""
import json

import numpy as np
import pytest
import torch

from genrefocus_core.basics.errors import ModelFileError
from genrefocus_core.generative import lora
from genrefocus_core.generative.condition_tokens import position_ids
from genrefocus_core.generative.flux_layouts import BflLayout
from genrefocus_core.generative.lora_slices import LoraSlices
from genrefocus_core.generative.multi_branch_forward import multi_branch_forward, prepare_constants, rotary_embedding
from genrefocus_core.generative.pipeline import GenRefocusPipeline
from genrefocus_core.generative.prompt_embedding import PromptEmbedding
from bfl_flux import build_tiny_bfl
from numerics import assert_fp32_close
from parity_cases import (DEFAULT_LORA_FILE, KIND_ADAPTER, case_names, check_recorded_trajectory, run_end_to_end,
                          uint8_error)
from tiny_flux import FLUX_FORWARD_CHAIN, build_tiny


@pytest.fixture(scope="module")
def both(tiny_dir, parity_dir):
    """(diffusers transformer with peft adapters, BflLayout with the same adapters as slices, VAE)."""
    manifest = json.loads((parity_dir / "manifest.json").read_text())
    transformer, vae = build_tiny(tiny_dir)
    bfl = build_tiny_bfl(tiny_dir)
    slices = LoraSlices(bfl)
    for case in manifest["cases"]:
        adapter = KIND_ADAPTER[case["kind"]]
        if adapter not in slices.adapters:
            path = tiny_dir / case.get("lora_file", DEFAULT_LORA_FILE[case["kind"]])
            lora.load_lora(transformer, path, adapter)
            slices.load_file(path, adapter)
    return transformer, BflLayout(bfl, slices), vae


@pytest.mark.parametrize("case_name", case_names())
def test_bfl_layout_parity(case_name, parity_dir, tiny_dir, both):
    """Every parity case on the BFL layout: recorded trajectory within 1e-4, end to end within 1/255."""
    case = {c["name"]: c for c in json.loads((parity_dir / "manifest.json").read_text())["cases"]}[case_name]
    z = {k: torch.from_numpy(v) for k, v in np.load(parity_dir / f"{case_name}.npz").items()}
    _, layout, vae = both
    check_recorded_trajectory(layout, case, z)
    embeddings = {s: PromptEmbedding.from_safetensors(tiny_dir / "prompt_embeds.safetensors", s)
                  for s in ("deblur", "bokeh")}
    pipe = GenRefocusPipeline(layout, vae, embeddings, device="cpu", dtype=torch.float32)
    out = run_end_to_end(pipe, case, z)
    err = uint8_error(out, z)
    assert err <= 1, f"{case_name}: 8-bit output off by {err}/255"


def _inputs(n_cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, cols, T = 4, 6, 7
    latents = torch.randn(2, rows * cols, 64, generator=g)
    prompt, pooled = torch.randn(2, T, 32, generator=g), torch.randn(2, 32, generator=g)
    conds = [torch.randn(2, rows * cols, 64, generator=g) for _ in range(n_cond)]
    ids = position_ids(rows, cols)
    return latents, prompt, pooled, conds, torch.zeros(T, 3), ids, [position_ids(rows, cols, (0, 3 * i)) for i in range(n_cond)]


@pytest.mark.parametrize("adapters", [[("deblurring",)], [("bokeh",), ("bokeh",)],
                                      [("deblurring",), ("bokeh",), ("deblurring", "bokeh")]])
def test_one_forward_agrees_between_layouts(both, adapters):
    """Batch of 2, mixed adapter sets per condition (several LoRA groups), guidance on."""
    transformer, layout, _ = both
    latents, prompt, pooled, conds, text_ids, ids, cond_ids = _inputs(len(adapters))
    outs = []
    with torch.no_grad():
        for model in (transformer, layout):
            cst = prepare_constants(model, prompt, pooled, conds, adapters, torch.float32).whole()
            rope = rotary_embedding(model, text_ids, ids, cond_ids)
            outs.append(multi_branch_forward(model, latents, torch.tensor([0.7, 0.3]), torch.tensor([3.5, 1.0]), cst, rope))
    assert_fp32_close(outs[1], outs[0], **FLUX_FORWARD_CHAIN)  # two code paths (fused BFL vs diffusers weights)
    assert outs[0].abs().max() > 0.1  # not a degenerate output


def test_lora_slices_touch_only_condition_tokens(tiny_dir):
    """The base weights are unchanged by loading, and without conditions (text and image only) the
    output is the plain model's, bit for bit (same kernels on the same data)."""
    bfl = build_tiny_bfl(tiny_dir)
    before = {k: v.clone() for k, v in bfl.state_dict().items()}
    slices = LoraSlices(bfl)
    names = slices.load_file(tiny_dir / "bokehNet.safetensors", "bokeh")
    assert len(names) == 25 and slices.adapters == ["bokeh"]
    assert all(torch.equal(before[k], v) for k, v in bfl.state_dict().items())
    latents, prompt, pooled, _, text_ids, ids, _ = _inputs(0)
    outs = []
    with torch.no_grad():
        for lora_set in (None, slices):
            layout = BflLayout(bfl, lora_set)
            cst = prepare_constants(layout, prompt, pooled, [], [], torch.float32).whole()
            outs.append(multi_branch_forward(layout, latents, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), cst,
                                             rotary_embedding(layout, text_ids, ids, [])))
    assert torch.equal(outs[0], outs[1])
    # with a condition, the adapter changes the result; unloading removes every tensor
    latents, prompt, pooled, conds, text_ids, ids, cond_ids = _inputs(1)
    with torch.no_grad():
        res = []
        for lora_set in (LoraSlices(bfl), slices):
            layout = BflLayout(bfl, lora_set)
            cst = prepare_constants(layout, prompt, pooled, conds, [("bokeh",)], torch.float32).whole()
            res.append(multi_branch_forward(layout, latents, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), cst,
                                            rotary_embedding(layout, text_ids, ids, cond_ids)))
    assert (res[0] - res[1]).abs().max() > 1e-3
    slices.unload("bokeh")
    assert slices.adapters == [] and len(slices.state_dict()) == 0 and slices.files == {}


def test_lora_slices_reject_files_for_other_models(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bfl = build_tiny_bfl(tiny_dir)
    tensors = load_file(str(tiny_dir / "bokehNet.safetensors"))
    key = next(k for k in tensors if k.endswith("attn.to_q.lora_B.weight") and "single" in k)
    wrong = dict(tensors, **{key: torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    slices = LoraSlices(bfl)
    with pytest.raises(ModelFileError, match="another model size"):
        slices.load_file(tmp_path / "wrong.safetensors", "bokeh")
    renamed = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ModelFileError, match="does not have"):
        slices.load_file(tmp_path / "deeper.safetensors", "bokeh")
    assert slices.adapters == []


def test_use_lora_files_on_slices(tiny_dir, tmp_path):
    """The same file-record rules as for peft adapters: unchanged files are not read again, others are,
    adapters not asked for are dropped, the adapter rules hold."""
    import shutil

    from genrefocus_core.basics.errors import InputError
    from genrefocus_core.generative.lora import use_lora_files

    slices = LoraSlices(build_tiny_bfl(tiny_dir))
    deblur, bokeh = tiny_dir / "deblurNet.safetensors", tmp_path / "bokehNet.safetensors"
    shutil.copy(tiny_dir / "bokehNet.safetensors", bokeh)
    use_lora_files(slices, {"deblurring": deblur, "bokeh": bokeh})
    assert sorted(slices.adapters) == ["bokeh", "deblurring"]
    keys = set(slices.state_dict())
    use_lora_files(slices, {"deblurring": deblur, "bokeh": bokeh})
    assert set(slices.state_dict()) == keys  # nothing re-read
    use_lora_files(slices, {"bokeh": bokeh})
    assert slices.adapters == ["bokeh"] and "deblurring" not in slices.files
    with pytest.raises(InputError, match="bokeh"):
        use_lora_files(slices, {"aperture": bokeh})


def test_attention_hook(both):
    """A layout's `attention` is what every branch's attention runs (ComfyUI's optimized attention on GPUs):
    an explicit softmax(q k^T / sqrt(d)) v gives the SDPA result within fp32 rounding (different summation
    order of one softmax and two small matmuls: ~1e-7 relative, far below 1e-5), and it is really called."""
    _, layout, _ = both
    latents, prompt, pooled, conds, text_ids, ids, cond_ids = _inputs(2)
    calls = []

    def explicit(q, k, v):
        calls.append(q.shape)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).flatten(2, 3)

    outs = []
    with torch.no_grad():
        for attention in (layout.attention, explicit):
            hooked = BflLayout(layout.model, layout.lora)
            hooked.attention = attention
            cst = prepare_constants(hooked, prompt, pooled, conds, [("bokeh",)] * 2, torch.float32).whole()
            outs.append(multi_branch_forward(hooked, latents, torch.tensor([0.4, 0.9]), torch.tensor([1.0, 1.0]), cst,
                                             rotary_embedding(hooked, text_ids, ids, cond_ids)))
    assert len(calls) == 2 * len(layout.double_blocks) + 2 * (len(layout.single_blocks) - 1) + 1
    assert (outs[0] - outs[1]).abs().max() < 1e-5
