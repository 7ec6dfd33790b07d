"""Schedule, tiling rules, settings validation and the denoising loop (tiles batched, callback, cancel)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genrefocus_core.generative import lora, sampling
from genrefocus_core.basics.errors import InputError, Interrupted
from genrefocus_core.generative.multi_branch_forward import prepare_constants
from genrefocus_core.generative.sampling import (DenoiseInputs, SamplerSettings, calculate_shift, denoise, flow_match_schedule,
                                      tile_origins, tile_starts, tile_token_index, tile_weights, use_tiling)


def test_schedule_matches_fixtures_exactly(parity_dir):
    manifest = json.loads((parity_dir / "manifest.json").read_text())
    for case in manifest["cases"]:
        z = np.load(parity_dir / case["npz"]) if "npz" in case else np.load(parity_dir / f"{case['name']}.npz")
        assert calculate_shift(case["image_seq_len"]) == pytest.approx(case["mu"], abs=1e-12)
        sigmas, timesteps = flow_match_schedule(case["steps"], case["image_seq_len"])
        assert np.array_equal(sigmas.numpy(), z["scheduler_sigmas"])
        assert np.array_equal(timesteps.numpy(), z["step_t"])


def test_schedule_shape_and_shift():
    sigmas, timesteps = flow_match_schedule(28, 4096)
    assert sigmas.shape == (29,) and timesteps.shape == (28,)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    # more tokens -> larger shift -> larger sigmas in the middle of the schedule
    assert flow_match_schedule(10, 4096)[0][5] > flow_match_schedule(10, 256)[0][5]
    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)


def test_tile_starts_follow_the_reference_rule():
    assert tile_starts(32, 32, 4) == [0]
    assert tile_starts(40, 32, 4) == [0, 8]
    assert tile_starts(64, 32, 4) == [0, 28, 32]
    assert tile_starts(96, 32, 4) == [0, 28, 56, 64]
    assert tile_starts(84, 32, 4) == [0, 28, 52]
    # width start outer, height start inner
    assert tile_origins(40, 64, 32, 4) == [(0, 0), (8, 0), (0, 28), (8, 28), (0, 32), (8, 32)]


@pytest.mark.parametrize("length,tile,overlap", [(33, 32, 4), (100, 16, 3), (50, 8, 0), (17, 16, 15)])
def test_generalised_tiles_cover_everything(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and s + tile <= length
        covered[s:s + tile] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_tile_weights_and_indices():
    w = tile_weights(32)
    d = torch.linspace(-2, 2, 32)
    assert torch.allclose(w.view(32, 32), torch.exp(-(d[:, None] ** 2 + d[None] ** 2)))
    assert w.view(32, 32)[0, 0] == pytest.approx(np.exp(-8), rel=1e-5)
    idx = tile_token_index((2, 3), 4, cols=10)
    assert idx[:5].tolist() == [23, 24, 25, 26, 33]


def test_auto_tiling_rule_and_forced_tiling():
    auto = SamplerSettings()
    assert use_tiling(auto, 32, 40)          # 512 x 640 px
    assert not use_tiling(auto, 31, 64)      # short side 496 px
    assert not use_tiling(auto, 8, 8)
    assert not use_tiling(SamplerSettings(tiled=False), 64, 64)
    assert use_tiling(SamplerSettings(tiled=True, tile_size=16), 20, 16)
    with pytest.raises(InputError, match="at least 512x512"):
        use_tiling(SamplerSettings(tiled=True), 31, 64)


@pytest.mark.parametrize("bad", [
    dict(steps=0), dict(steps=-3), dict(steps=2.5), dict(steps=True), dict(seed=-1), dict(seed="x"),
    dict(tiled="yes"), dict(tile_size=2), dict(tile_overlap=32), dict(tile_overlap=-1), dict(tile_batch=0),
    dict(rng="global"), dict(guidance=float("nan")), dict(noise=np.zeros(3)),
])
def test_settings_validation(bad):
    with pytest.raises(InputError):
        SamplerSettings(**bad).validated()


def test_noise_shapes():
    noise = torch.randn(1, 16, 8, 10)
    assert sampling.check_noise(noise, 3, 4, 5).shape == (3, 16, 8, 10)
    packed = torch.randn(2, 20, 64)
    assert sampling.check_noise(packed, 2, 4, 5).shape == (2, 16, 8, 10)
    with pytest.raises(InputError, match="Initial noise"):
        sampling.check_noise(torch.randn(1, 16, 8, 8), 1, 4, 5)
    with pytest.raises(InputError, match="batch"):
        sampling.check_noise(torch.randn(2, 16, 8, 10), 3, 4, 5)


# ---------------------------------------------------------------------------------- denoising loop

@pytest.fixture(scope="module")
def tiny_transformer(tiny_dir):
    from diffusers import FluxTransformer2DModel

    config = json.loads((tiny_dir / "configs.json").read_text())["transformer"]
    t = FluxTransformer2DModel(**config)
    t.load_state_dict(load_file(str(tiny_dir / "transformer.safetensors")))
    t.eval().requires_grad_(False)
    lora.load_lora(t, tiny_dir / "bokehNet.safetensors", "bokeh")
    return t


def _inputs(transformer, rows, cols, n_cond=2, batch=1, seed=0, text_len=16):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, rows * cols, 64, generator=g)
    prompt = torch.randn(1, text_len, 32, generator=g).expand(batch, -1, -1)
    pooled = torch.randn(1, 32, generator=g).expand(batch, -1)
    conds = [torch.randn(batch, rows * cols, 64, generator=g) for _ in range(n_cond)]
    from genrefocus_core.generative.condition_tokens import position_ids
    with torch.no_grad():
        constants = prepare_constants(transformer, prompt, pooled, conds, [("bokeh",)] * n_cond, torch.float32)
    ids = [position_ids(rows, cols) for _ in range(n_cond)]
    return latents, DenoiseInputs(constants, torch.zeros(text_len, 3), rows, cols, ids, [True] * n_cond, 1.0)


def test_tiled_512x640_tile_batches_agree_and_callback_reports_steps(tiny_transformer):
    latents, inputs = _inputs(tiny_transformer, 32, 40, batch=1)  # 512 x 640 px: 2 tiles of 32x32
    calls = []
    with torch.no_grad():
        one = denoise(tiny_transformer, latents, inputs, SamplerSettings(steps=2, tiled=True, tile_batch=1),
                      callback=lambda s, n, lat: calls.append((s, n, tuple(lat.shape))))
        two = denoise(tiny_transformer, latents, inputs, SamplerSettings(steps=2, tiled=True, tile_batch=2))
    assert calls == [(1, 2, (1, 16, 64, 80)), (2, 2, (1, 16, 64, 80))]
    assert (one - two).abs().max().item() < 1e-5
    assert torch.isfinite(one).all()


def test_small_tiles_batched_and_images_batched(tiny_transformer):
    # 12 x 20 grid with 8-token tiles, overlap 2: 2 x 3 = 6 tiles; batch of 2 images
    latents, inputs = _inputs(tiny_transformer, 12, 20, batch=2, text_len=8)
    settings = SamplerSettings(steps=1, tiled=True, tile_size=8, tile_overlap=2)
    assert len(tile_origins(12, 20, 8, 2)) == 6
    with torch.no_grad():
        a = denoise(tiny_transformer, latents, inputs, settings)
        b = denoise(tiny_transformer, latents, inputs, SamplerSettings(steps=1, tiled=True, tile_size=8,
                                                                       tile_overlap=2, tile_batch=4))
        untiled = denoise(tiny_transformer, latents, inputs, SamplerSettings(steps=1, tiled=False))
    assert (a - b).abs().max().item() < 1e-5
    assert (a - untiled).abs().max().item() > 1e-4  # tiling is a different computation


def test_mu_comes_from_the_whole_image_when_tiling(tiny_transformer, monkeypatch):
    seen = []
    real = sampling.flow_match_schedule
    monkeypatch.setattr(sampling, "flow_match_schedule", lambda steps, n: seen.append(n) or real(steps, n))
    latents, inputs = _inputs(tiny_transformer, 12, 20, n_cond=1, text_len=8)
    with torch.no_grad():
        denoise(tiny_transformer, latents, inputs, SamplerSettings(steps=1, tiled=True, tile_size=8))
    assert seen == [240]


def test_callback_can_cancel(tiny_transformer):
    latents, inputs = _inputs(tiny_transformer, 4, 4, text_len=8)
    steps_seen = []

    def cancel_at_two(step, total, lat):
        steps_seen.append(step)
        if step == 2:
            raise Interrupted("cancelled by the user")

    with pytest.raises(Interrupted), torch.no_grad():
        denoise(tiny_transformer, latents, inputs, SamplerSettings(steps=5, tiled=False), callback=cancel_at_two)
    assert steps_seen == [1, 2]


def test_denoise_checks_grid(tiny_transformer):
    latents, inputs = _inputs(tiny_transformer, 4, 4, text_len=8)
    with pytest.raises(ValueError):
        denoise(tiny_transformer, latents[:, :15], inputs, SamplerSettings(steps=1))
    with pytest.raises(InputError):
        denoise(tiny_transformer, latents, inputs, SamplerSettings(steps=0))
