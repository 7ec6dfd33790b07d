"""LoRA files as peft named adapters, and where the multi-branch forward applies them."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from genrefocus_core.generative import lora
from genrefocus_core.basics.errors import MissingModelFileError, ModelFileError
from genrefocus_core.generative.multi_branch_forward import multi_branch_forward, prepare_constants, rotary_embedding
from genrefocus_core.generative.condition_tokens import position_ids


def build_transformer(tiny_dir):
    from diffusers import FluxTransformer2DModel

    config = json.loads((tiny_dir / "configs.json").read_text())["transformer"]
    t = FluxTransformer2DModel(**config)
    t.load_state_dict(load_file(str(tiny_dir / "transformer.safetensors")))
    return t.eval().requires_grad_(False)


@pytest.fixture()
def transformer(tiny_dir):
    return build_transformer(tiny_dir)


@pytest.fixture(scope="module")
def released(tiny_dir):
    return load_file(str(tiny_dir / "bokehNet.safetensors"))


def test_released_format_loads_as_named_adapters(transformer, tiny_dir, released):
    modules = lora.load_lora(transformer, tiny_dir / "deblurNet.safetensors", "deblurring")
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    assert len(modules) == 25
    assert lora.loaded_adapters(transformer) == ["deblurring", "bokeh"]
    named = dict(transformer.named_modules())
    for key, value in released.items():
        module_path, ab = key[len("transformer."):].rsplit(".lora_", 1)
        layer = named[module_path]
        assert lora.is_lora_layer(layer)
        stored = (layer.lora_A if ab.startswith("A") else layer.lora_B)["bokeh"].weight
        assert torch.equal(stored, value)
    # text-side modules and the final projection never get a LoRA
    for name in ("context_embedder", "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.ff_context.net.2",
                 "proj_out", "norm_out.linear", "transformer_blocks.0.norm1_context.linear"):
        assert not lora.is_lora_layer(named[name]), name


def test_unload_restores_base_weights_bit_identical(transformer, tiny_dir):
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    types_before = {n: type(m) for n, m in transformer.named_modules()}
    lora.load_lora(transformer, tiny_dir / "deblurNet.safetensors", "deblurring")
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    lora.unload_lora(transformer, "bokeh")
    assert lora.loaded_adapters(transformer) == ["deblurring"]
    lora.unload_lora(transformer)
    assert lora.loaded_adapters(transformer) == []
    after = transformer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in transformer.named_modules()} == types_before
    assert not hasattr(transformer, "peft_config")


def test_reloading_an_adapter_replaces_it(transformer, tiny_dir, tmp_path, released):
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    doubled = {k: v * 2 for k, v in released.items()}
    save_file(doubled, str(tmp_path / "doubled.safetensors"))
    lora.load_lora(transformer, tmp_path / "doubled.safetensors", "bokeh")
    layer = transformer.transformer_blocks[0].attn.to_q
    assert torch.equal(layer.lora_A["bokeh"].weight, released["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] * 2)
    assert lora.loaded_adapters(transformer) == ["bokeh"]


def test_ranks_follow_the_file(transformer, tmp_path, released):
    sd = {}
    for key, value in released.items():
        rank = 8 if "single_transformer_blocks.1." in key else 2
        if key.endswith("lora_A.weight"):
            sd[key] = torch.randn(rank, value.shape[1])
        else:
            sd[key] = torch.randn(value.shape[0], rank)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    lora.load_lora(transformer, tmp_path / "mixed.safetensors", "pre_deblur")
    assert transformer.single_transformer_blocks[1].proj_out.lora_A["pre_deblur"].weight.shape[0] == 8
    assert transformer.transformer_blocks[0].attn.to_q.lora_A["pre_deblur"].weight.shape[0] == 2


def test_use_lora_files_keeps_a_true_record_across_failed_switches(transformer, tiny_dir, tmp_path, released,
                                                                    monkeypatch):
    """Switch an adapter to a corrupt file (refused, the previous adapter stays), then back: it is still
    there and not read again; a file changed on disk is read again; unwanted adapters go; the
    aperture-needs-bokeh rule holds on every call."""
    from genrefocus_core.basics.errors import InputError

    bokeh, deblur = tiny_dir / "bokehNet.safetensors", tiny_dir / "deblurNet.safetensors"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file at all")
    lora.use_lora_files(transformer, {"deblurring": deblur, "bokeh": bokeh})
    reads = []
    real = lora.read_lora_file
    monkeypatch.setattr(lora, "read_lora_file", lambda path: reads.append(str(path)) or real(path))
    with pytest.raises(ModelFileError, match="corrupt"):
        lora.use_lora_files(transformer, {"deblurring": deblur, "bokeh": corrupt})
    lora.use_lora_files(transformer, {"deblurring": deblur, "bokeh": bokeh})
    assert lora.loaded_adapters(transformer) == ["deblurring", "bokeh"] and reads == [str(corrupt)]
    layer = transformer.transformer_blocks[0].attn.to_q
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    assert torch.equal(layer.lora_A["bokeh"].weight, released[key])
    with pytest.raises(InputError, match="bokeh_lora"):
        lora.use_lora_files(transformer, {"deblurring": deblur, "aperture": bokeh})
    assert lora.loaded_adapters(transformer) == ["deblurring", "bokeh"]  # refused before any change
    changed = _write(tmp_path, "bokeh.safetensors", released)
    lora.use_lora_files(transformer, {"bokeh": changed})
    assert lora.loaded_adapters(transformer) == ["bokeh"]
    _write(tmp_path, "bokeh.safetensors", {k: v * 2 for k, v in released.items()})
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # clock ticks are coarse
    lora.use_lora_files(transformer, {"bokeh": changed})  # same path, new content: read again
    layer = transformer.transformer_blocks[0].attn.to_q
    assert torch.equal(layer.lora_A["bokeh"].weight, released[key] * 2)
    lora.unload_lora(transformer)
    lora.use_lora_files(transformer, {"bokeh": changed})  # unloaded behind its back: loaded again
    assert lora.loaded_adapters(transformer) == ["bokeh"]


def _write(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_bad_files_raise_model_file_error_and_leave_model_untouched(transformer, tmp_path, released, tiny_dir):
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file at all")
    other_model = _write(tmp_path, "sdxl_lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)})
    unknown_module = _write(tmp_path, "other_arch.safetensors", {
        "transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 32),
        "transformer.blocks.0.attn.qkv.lora_B.weight": torch.zeros(96, 4)})
    wrong_shape = dict(released)
    wrong_shape["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(4, 3072)
    wrong_shape = _write(tmp_path, "bigger_model.safetensors", wrong_shape)
    half = {k: v for k, v in released.items() if not k.endswith("x_embedder.lora_B.weight")}
    half = _write(tmp_path, "missing_b.safetensors", half)
    inconsistent = dict(released)
    inconsistent["transformer.x_embedder.lora_B.weight"] = torch.zeros(32, 5)
    inconsistent = _write(tmp_path, "inconsistent.safetensors", inconsistent)
    nan = dict(released)
    nan["transformer.x_embedder.lora_B.weight"] = torch.full_like(released["transformer.x_embedder.lora_B.weight"], float("nan"))
    nan = _write(tmp_path, "nan.safetensors", nan)
    cases = {corrupt: "corrupt", other_model: "not a GenRefocus", unknown_module: "another base model",
             wrong_shape: "another model size", half: "no lora_B", inconsistent: "inconsistent shapes",
             nan: "NaN"}
    for path, words in cases.items():
        with pytest.raises(ModelFileError) as info:
            lora.load_lora(transformer, path, "bokeh")
        assert path.name in str(info.value) and words in str(info.value), str(info.value)
    with pytest.raises(MissingModelFileError) as info:
        lora.load_lora(transformer, tmp_path / "bokehNet.safetensors", "bokeh")
    assert "bokehNet.safetensors" in str(info.value) and str(tmp_path) in str(info.value)
    assert lora.loaded_adapters(transformer) == []
    after = transformer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    from genrefocus_core.generative.pipeline import GenRefocusPipeline
    with pytest.raises(ModelFileError, match="deblurNet.safetensors"):
        GenRefocusPipeline(transformer, None, {}, device="cpu", dtype=torch.float32)._require_adapters(["deblurring"])


def _forward_inputs(transformer, n_cond, rows=4, cols=4, adapters=("bokeh",), seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 1, 8
    latents = torch.randn(B, rows * cols, 64, generator=g)
    prompt = torch.randn(B, T, 32, generator=g)
    pooled = torch.randn(B, 32, generator=g)
    conds = [torch.randn(B, rows * cols, 64, generator=g) for _ in range(n_cond)]
    text_ids = torch.zeros(T, 3)
    ids = position_ids(rows, cols)
    constants = prepare_constants(transformer, prompt, pooled, conds, [adapters] * n_cond, torch.float32).whole()
    rope = rotary_embedding(transformer, text_ids, ids, [position_ids(rows, cols, (0, 4 * i)) for i in range(n_cond)])
    return latents, constants, rope


def test_lora_delta_is_computed_for_condition_tokens_only(transformer, tiny_dir):
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    seen = []
    hooks = [m.lora_A["bokeh"].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-2]))
             for m in transformer.modules() if lora.is_lora_layer(m)]
    n, L = 2, 16
    with torch.no_grad():
        latents, constants, rope = _forward_inputs(transformer, n)
        seen.clear()  # the condition embedding (x_embedder) ran in prepare_constants
        multi_branch_forward(transformer, latents, torch.tensor([0.7]), torch.tensor([3.5]), constants, rope)
    for h in hooks:
        h.remove()
    # per block: modulation rows (1 group) and n*L condition tokens; never text (8) or image (16) tokens
    assert seen and set(seen) <= {1, n * L}, sorted(set(seen))


def test_lora_scale_is_exactly_one_whatever_peft_scaling_says(transformer, tiny_dir):
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    with torch.no_grad():
        latents, constants, rope = _forward_inputs(transformer, 1)
        a = multi_branch_forward(transformer, latents, torch.tensor([0.5]), torch.tensor([1.0]), constants, rope)
        for m in transformer.modules():
            if lora.is_lora_layer(m):
                m.scaling["bokeh"] = 0.25
        latents, constants, rope = _forward_inputs(transformer, 1)
        b = multi_branch_forward(transformer, latents, torch.tensor([0.5]), torch.tensor([1.0]), constants, rope)
    assert torch.equal(a, b)


def test_base_branches_match_plain_flux_with_adapters_loaded(transformer, tiny_dir):
    g = torch.Generator().manual_seed(3)
    latents, prompt, pooled = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    ids, text_ids = position_ids(4, 4), torch.zeros(8, 3)
    with torch.no_grad():
        plain = transformer(hidden_states=latents, encoder_hidden_states=prompt, pooled_projections=pooled,
                            timestep=torch.tensor([0.6]), img_ids=ids, txt_ids=text_ids, guidance=torch.tensor([3.5]),
                            return_dict=False)[0]
        lora.load_lora(transformer, tiny_dir / "deblurNet.safetensors", "deblurring")
        constants = prepare_constants(transformer, prompt, pooled, [], [], torch.float32).whole()
        ours = multi_branch_forward(transformer, latents, torch.tensor([0.6]), torch.tensor([3.5]), constants,
                                    rotary_embedding(transformer, text_ids, ids, []))
    assert (ours - plain).abs().max().item() < 1e-5


def test_condition_adapter_changes_only_through_condition_branches(transformer, tiny_dir):
    """With conditions, the LoRA matters (and which adapter is used matters)."""
    lora.load_lora(transformer, tiny_dir / "deblurNet.safetensors", "deblurring")
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    with torch.no_grad():
        outs = {}
        for adapters in [(), ("bokeh",), ("deblurring",)]:
            latents, constants, rope = _forward_inputs(transformer, 1, adapters=adapters)
            outs[adapters] = multi_branch_forward(transformer, latents, torch.tensor([0.5]), torch.tensor([1.0]),
                                                  constants, rope)
    assert (outs[("bokeh",)] - outs[()]).abs().max() > 1e-3
    assert (outs[("bokeh",)] - outs[("deblurring",)]).abs().max() > 1e-3
