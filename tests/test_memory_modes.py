"""Memory modes on CPU with the tiny FLUX: fp8 storage, model and sequential offload, residency order.

Measured deviations from fp32 (tiny random FLUX, 2 steps, output images in [0, 1]): bf16 ~0.054,
fp8 ~0.058 (max abs), sequential == bf16 bit for bit. Tolerance used: 0.12 (docs/models.md).
"""
import pytest
import torch
from torch import nn

from genrefocus_core.generative import flux_loading as fl
from genrefocus_core.generative import lora as lora_files
from genrefocus_core.generative import memory
from genrefocus_core.basics.errors import InputError
from genrefocus_core.generative.loader import load_genrefocus
from genrefocus_core.generative.sampling import SamplerSettings

MODE_TOLERANCE = 0.12


@pytest.fixture(scope="module")
def pipe_dir(tiny_dir):
    return tiny_dir / "pipeline"


def _block_linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and ".lora_" not in n}


def _forward(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    c = model.config
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return model(hidden_states=torch.randn(1, 16, c.in_channels, generator=g).to(dtype),
                 encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g).to(dtype),
                 pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).to(dtype),
                 timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=ids.reshape(-1, 3),
                 txt_ids=torch.zeros(8, 3), return_dict=False)[0].float()


def test_mode_table():
    assert set(memory.MEMORY_MODES) == {"default", "low", "sequential", "fp32"}
    assert memory.get_memory_mode("LOW").fp8 and memory.get_memory_mode("low").compute_dtype == torch.bfloat16
    assert memory.get_memory_mode("default").offload == "model"
    with pytest.raises(InputError, match="default, low, sequential, fp32"):
        memory.get_memory_mode("turbo")
    with pytest.raises(InputError, match="device"):
        memory.Offloader("default", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            memory.Offloader("low", device="cuda")


@torch.no_grad()
def test_fp8_storage_one_byte_per_weight(pipe_dir):
    ref = fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    model = fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    linears = _block_linears(model)
    n_weights = sum(m.weight.numel() for m in linears.values())
    converted = memory.to_fp8_storage(model, compute_dtype=torch.bfloat16)
    assert converted == len(linears) > 0
    for m in linears.values():
        assert isinstance(m, memory.Float8StorageLinear) and isinstance(m, nn.Linear)
        assert m.weight.dtype == torch.float8_e4m3fn and m.weight.element_size() == 1
        assert m.weight_scale.dtype == torch.float32 and m.weight_scale.numel() == 1
    by_dtype = memory.storage_bytes(model)
    assert by_dtype["float8_e4m3fn"] == n_weights  # exactly one byte per stored block weight
    # moving or casting the module keeps fp8 storage; a dtype cast only changes the compute dtype
    model.to("cpu").to(torch.bfloat16)
    q = model.transformer_blocks[0].attn.to_q
    assert q.weight.dtype == torch.float8_e4m3fn and q.compute_dtype == torch.bfloat16
    assert q.weight_scale.dtype == torch.float32
    # each layer reproduces its fp32 original within fp8 precision
    x = torch.randn(5, q.in_features)
    want = ref.transformer_blocks[0].attn.to_q(x)
    rel = (q(x).float() - want).abs().max() / want.abs().max()
    assert rel < 0.08
    out, want = _forward(model, torch.bfloat16), _forward(ref)
    assert (out - want).abs().max() / want.abs().max() < 0.15


def test_fp8_layers_take_peft_lora_and_unload_bit_exact(pipe_dir, tiny_dir):
    model = fl.load_flux_transformer(pipe_dir, dtype=torch.bfloat16, keep_fp8=True)
    before = {n: m.weight.detach().view(torch.uint8).clone() for n, m in _block_linears(model).items()}
    lora_files.load_lora(model, tiny_dir / "deblurNet.safetensors", "deblurring")
    layer = model.transformer_blocks[0].attn.to_q
    assert isinstance(layer.get_base_layer(), memory.Float8StorageLinear)
    assert layer.lora_A["deblurring"].weight.dtype == torch.bfloat16  # adapters in the compute dtype
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer.get_base_layer()(x) + layer.lora_B["deblurring"](layer.lora_A["deblurring"](x))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    lora_files.unload_lora(model, "deblurring")
    after = {n: m.weight.detach().view(torch.uint8) for n, m in _block_linears(model).items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_model_offload_moves_in_and_back_also_on_error(pipe_dir):
    model = fl.load_flux_transformer(pipe_dir, dtype=torch.bfloat16)
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    plan = memory.Offloader("default", device="cpu")
    plan.prepare(model)
    with plan.stage(model):
        assert plan.stats.resident == total
    assert plan.stats.resident == 0 and plan.stats.peak == total
    with pytest.raises(RuntimeError):
        with plan.stage(model):
            raise RuntimeError("cancelled mid-stage")
    assert plan.stats.resident == 0
    assert all(p.device.type == "cpu" for p in model.parameters())


@torch.no_grad()
def test_model_offload_brings_only_the_adapters_a_stage_uses(pipe_dir, tiny_dir):
    model = fl.load_flux_transformer(pipe_dir, dtype=torch.bfloat16)
    lora_files.load_lora(model, tiny_dir / "deblurNet.safetensors", "deblurring")
    lora_files.load_lora(model, tiny_dir / "bokehNet.safetensors", "bokeh")
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    adapter = {name: size(p for n, p in model.named_parameters() if f".{name}." in n + ".")
               for name in ("deblurring", "bokeh")}
    total = size(list(model.parameters()) + list(model.buffers()))
    base = total - adapter["deblurring"] - adapter["bokeh"]
    assert adapter["deblurring"] > 0 and adapter["bokeh"] > 0
    plan = memory.Offloader("default", device="cpu")
    plan.prepare(model)
    with plan.stage(model):
        assert plan.stats.resident == base
        for m in model.modules():
            if lora_files.is_lora_layer(m) and "deblurring" in m.lora_A:
                m.lora_B["deblurring"](m.lora_A["deblurring"](torch.zeros(1, m.in_features, dtype=torch.bfloat16)))
        assert plan.stats.resident == base + adapter["deblurring"]  # BokehNet's adapter stayed behind
    assert plan.stats.resident == 0 and plan.stats.peak == base + adapter["deblurring"]


@torch.no_grad()
def test_sequential_offload_one_layer_at_a_time(pipe_dir, tiny_dir):
    ref = fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    model = fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    want = _forward(ref)
    plan = memory.Offloader("sequential", device="cpu")
    plan.prepare(model)
    out = _forward(model)
    assert torch.equal(out, want)  # hooks never change the maths
    largest_own = max(sum(t.numel() * t.element_size() for t in
                          list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
                      for m in model.modules())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.stats.resident == 0
    assert 0 < plan.stats.peak <= largest_own < total / 10
    modules_with_weights = sum(1 for m in model.modules() if list(m.parameters(recurse=False)))
    assert plan.stats.transfers >= modules_with_weights
    assert all(p.device.type == "cpu" for p in model.parameters())
    with plan.stage(model):  # stage is a no-op for hooked modules
        assert plan.stats.resident == 0
    # an adapter loaded after prepare() (e.g. swapped in by a node) is hooked when the next stage starts
    lora_files.load_lora(model, tiny_dir / "bokehNet.safetensors", "bokeh")
    unhooked = [n for n, m in model.named_modules() if list(m.parameters(recurse=False)) and not m._forward_pre_hooks]
    assert unhooked and all(".lora_" in n for n in unhooked)
    with plan.stage(model):
        assert all(m._forward_pre_hooks for m in model.modules() if list(m.parameters(recurse=False)))
    plan.release(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def mode_outputs(tiny_dir, pipe_dir):
    torch.manual_seed(0)
    image = torch.rand(1, 48, 40, 3)
    defocus = torch.zeros(1, 48, 40)
    defocus[:, :, 20:] = 30.0
    outs, plans = {}, {}
    for mode in ("fp32", "default", "low", "sequential"):
        pipe = load_genrefocus(diffusers_dir=pipe_dir, deblur_lora=tiny_dir / "deblurNet.safetensors",
                               bokeh_lora=tiny_dir / "bokehNet.safetensors", memory_mode=mode, device="cpu",
                               prompt_embeddings=tiny_dir / "prompt_embeds.safetensors")
        settings = SamplerSettings(steps=2, seed=3)
        outs[mode] = (pipe.deblur(image, settings=settings), pipe.bokeh(image, defocus, settings=settings))
        plans[mode] = pipe
    return outs, plans


@pytest.mark.parametrize("mode", ["default", "low", "sequential"])
def test_each_mode_matches_fp32(mode_outputs, mode):
    outs, plans = mode_outputs
    for got, want in zip(outs[mode], outs["fp32"]):
        assert got.shape == want.shape == (1, 48, 40, 3) and got.dtype == torch.float32
        assert (got - want).abs().max() < MODE_TOLERANCE
    pipe = plans[mode]
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())
    assert pipe.offload.stats.resident == 0 and pipe.offload.stats.peak > 0
    if mode == "low":
        assert "float8_e4m3fn" in memory.storage_bytes(pipe.transformer)


def test_sequential_equals_default_bit_for_bit(mode_outputs):
    outs, plans = mode_outputs
    assert all(torch.equal(a, b) for a, b in zip(outs["sequential"], outs["default"]))
    seq, full = plans["sequential"].offload.stats, plans["default"].offload.stats
    vae = plans["sequential"].vae
    vae_bytes = sum(t.numel() * t.element_size() for t in list(vae.parameters()) + list(vae.buffers()))
    # the transformer one layer at a time; the small VAE is moved whole (its callers read its device)
    assert seq.peak == vae_bytes < full.peak


def test_text_encoders_freed_before_flux_is_loaded(tiny_dir, pipe_dir, tmp_path, monkeypatch):
    from genrefocus_core.generative import prompt_cache as pc

    events = []
    orig_load, orig_free = pc.PromptEncoder.load, pc.PromptEncoder.free
    orig_transformer = fl.load_flux_transformer

    def load(self):
        events.append("encoders loaded")
        return orig_load(self)

    def free(self):
        if self.loaded:
            events.append("encoders freed")
        return orig_free(self)

    def transformer(*a, **k):
        events.append("flux loaded")
        return orig_transformer(*a, **k)

    monkeypatch.setattr(pc.PromptEncoder, "load", load)
    monkeypatch.setattr(pc.PromptEncoder, "free", free)
    monkeypatch.setattr(fl, "load_flux_transformer", transformer)
    pipe = load_genrefocus(diffusers_dir=pipe_dir, deblur_lora=tiny_dir / "deblurNet.safetensors",
                           bokeh_lora=tiny_dir / "bokehNet.safetensors", memory_mode="fp32", device="cpu",
                           cache_dir=tmp_path)
    assert events[-1] == "flux loaded" and "encoders freed" in events
    assert events.index("encoders freed") < events.index("flux loaded")
    assert set(pipe.prompt_embeddings) == {"deblur", "bokeh"}
    events.clear()
    load_genrefocus(diffusers_dir=pipe_dir, deblur_lora=tiny_dir / "deblurNet.safetensors", memory_mode="fp32",
                    device="cpu", cache_dir=tmp_path)
    assert events == ["flux loaded"]  # second run: cached, no encoder at all
