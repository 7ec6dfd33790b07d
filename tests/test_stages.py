"""GenRefocusPipeline stages on the tiny model: sizes, batches, K = 0, seeds, aperture, bad input."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from genrefocus_core.generative import lora
from genrefocus_core.basics.errors import InputError, Interrupted, ModelFileError
from genrefocus_core.generative.pipeline import GenRefocusPipeline
from genrefocus_core.generative.prompt_embedding import PromptEmbedding
from genrefocus_core.generative.sampling import SamplerSettings
from tiny_flux import build_tiny

FAST = SamplerSettings(steps=2, seed=7)
FAST_BOKEH = SamplerSettings(steps=2, seed=1234)


class SquareAperture:
    """Minimal stand-in for apertures.Aperture: a filled square exemplar."""

    def condition_image(self, height, width):
        img = torch.zeros(1, height, width, 3)
        img[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
        return img


@pytest.fixture(scope="module")
def pipe(tiny_dir, tmp_path_factory):
    transformer, vae = build_tiny(tiny_dir)
    lora.load_lora(transformer, tiny_dir / "deblurNet.safetensors", "deblurring")
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    lora.load_lora(transformer, tiny_dir / "deblurNet.safetensors", "pre_deblur")
    g = torch.Generator().manual_seed(5)
    aperture_sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in load_file(str(tiny_dir / "bokehNet.safetensors")).items()}
    path = tmp_path_factory.mktemp("lora") / "aperture.safetensors"
    save_file(aperture_sd, str(path))
    lora.load_lora(transformer, path, "aperture")
    embeddings = {s: PromptEmbedding.from_safetensors(tiny_dir / "prompt_embeds.safetensors", s) for s in ("deblur", "bokeh")}
    return GenRefocusPipeline(transformer, vae, embeddings, device="cpu", dtype=torch.float32)


def _image(h, w, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)


def _defocus(h, w, b=1, scale=20.0):
    ramp = torch.linspace(0, scale, w)[None, None].expand(b, h, w)
    return ramp.contiguous()


def test_deblur_any_size_returns_exact_size(pipe):
    out = pipe.deblur(_image(40, 72), settings=FAST)
    assert out.shape == (1, 40, 72, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    tiny = pipe.deblur(_image(10, 7), settings=SamplerSettings(steps=1, seed=1))  # smaller than 16 px: padded
    assert tiny.shape == (1, 10, 7, 3)


def test_grey_rgba_uint8_and_numpy_inputs(pipe):
    rgba = (np.random.default_rng(0).random((32, 32, 4)) * 255).astype(np.uint8)
    grey = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    assert pipe.deblur(rgba, settings=SamplerSettings(steps=1, seed=1)).shape == (1, 32, 32, 3)
    assert pipe.deblur(grey, settings=SamplerSettings(steps=1, seed=1)).shape == (1, 32, 32, 3)


def test_seeded_runs_are_reproducible_and_leave_global_rng_alone(pipe):
    state = torch.get_rng_state()
    a = pipe.bokeh(_image(32, 48), _defocus(32, 48), settings=FAST_BOKEH)
    assert torch.equal(torch.get_rng_state(), state)
    b = pipe.bokeh(_image(32, 48), _defocus(32, 48), settings=FAST_BOKEH)
    assert torch.equal(a, b)
    assert pipe.last_seed == 1234
    c = pipe.bokeh(_image(32, 48), _defocus(32, 48), settings=SamplerSettings(steps=2, seed=99))
    assert (a - c).abs().max() > 1e-3
    pipe.deblur(_image(32, 32), settings=SamplerSettings(steps=1))  # seed None: a fresh seed, reported
    assert isinstance(pipe.last_seed, int)


def test_explicit_noise_equals_seeded_noise(pipe):
    seed = 11
    noise = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(seed))
    # local protocol: the same generator then draws the VAE samples, so use the reference protocol,
    # where the VAE samples come from the (re-seeded) global RNG either way
    ref = SamplerSettings(steps=2, seed=seed, rng="reference")
    a = pipe.bokeh(_image(32, 48), _defocus(32, 48), settings=ref)
    b = pipe.bokeh(_image(32, 48), _defocus(32, 48), settings=SamplerSettings(steps=2, noise=noise, rng="reference"))
    assert torch.equal(a, b)


def test_k_zero_returns_the_aif_image_without_sampling(pipe):
    calls = []
    hook = pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        image = _image(24, 40, b=2)
        out = pipe.bokeh(image, torch.zeros(24, 40), settings=FAST_BOKEH)
    finally:
        hook.remove()
    assert torch.equal(out, image) and not calls


def test_bokeh_batch_with_one_in_focus_image(pipe):
    image = _image(32, 32, b=2)
    defocus = torch.stack([torch.zeros(32, 32), _defocus(32, 32)[0]])
    out = pipe.bokeh(image, defocus, settings=FAST_BOKEH)
    assert out.shape == (2, 32, 32, 3)
    assert torch.equal(out[0], image[0]) and not torch.equal(out[1], image[1])


def test_focus_pull_frames_share_the_noise_so_only_the_blur_changes(pipe):
    """A rack focus on the built-in scene through BokehNet with one seed: every frame is sampled from the
    same noise, so frames differ only through their defocus maps. (Where in the frame they differ is the
    network's business: the tiny random transformer attends globally, so no spatial locality is claimed.)"""
    from genrefocus_core.basics import focus_pull
    from genrefocus_core.basics.defocus import disparity_from_depth
    from genrefocus_core.basics.scene import CARD_M, make_scene

    image, depth = make_scene(32, 32, seed=0)
    disp = disparity_from_depth(depth)
    pull = focus_pull.focus_pull(disp, f"0: distance {CARD_M}\n1: distance {CARD_M}\n3: distance 20 linear",
                                 frames=4, K=30.0)
    maps = pull.signed_coc(disp).abs()
    assert torch.equal(maps[0], maps[1]) and not torch.equal(maps[2], maps[3])
    frames = pipe.bokeh(image, maps, settings=FAST_BOKEH, hold_unchanged=False)  # the still serves every frame
    # equal blur -> equal frames. Same inputs in one batch; a BLAS kernel may still block rows of the
    # batch differently (AVX2 vs AVX-512), so the frames agree to fp32 summation-order rounding: the
    # batched-vs-single bound below (1e-4), far under the 1e-3 the blur changes make
    tol = 1e-4
    assert (frames[0] - frames[1]).abs().max() < tol
    assert (frames[2] - frames[3]).abs().max() > 1e-3
    # each frame is what a run on that frame alone gives: batched vs single fp32 matmuls differ in
    # summation order only (measured 2e-6; 1e-4 leaves room for other BLAS kernels)
    alone = pipe.bokeh(image, maps[2:3], settings=FAST_BOKEH, hold_unchanged=False)
    assert (frames[2] - alone[0]).abs().max() < 1e-4
    # changing one frame's blur leaves the other frames exactly as they were
    other = maps.clone()
    other[3] = maps[2]
    again = pipe.bokeh(image, other, settings=FAST_BOKEH, hold_unchanged=False)
    assert (again[:3] - frames[:3]).abs().max() < tol and (again[3] - frames[2]).abs().max() < tol
    # with independent noise per image the equal-blur frames differ: the test above can fail
    independent = pipe.bokeh(image, maps[:2], settings=SamplerSettings(steps=2, seed=1234, batch_noise="independent"))
    assert (independent[0] - independent[1]).abs().max() > 1e-2
    with pytest.raises(InputError, match="batch_noise"):
        pipe.bokeh(image, maps, settings=SamplerSettings(steps=2, batch_noise="per frame"))


def test_focus_pull_frames_differ_only_where_the_blur_differs(pipe):
    """A clip whose blur changes in one corner only: with the fixed noise and the hold (the default),
    the frames differ only where the blur changed and where that corner's light can land (its radius
    plus the feathered seam); there the frame is exactly as sampled. Without the hold, the tiny
    transformer's global attention moves every pixel a little: what the hold is for."""
    image = _image(48, 48)
    base = torch.full((48, 48), 2.0)
    grown = base.clone()
    grown[:8, :8] = 5.0  # the corner's blur radius grows from 2 to 5 px
    maps = torch.stack([base, base, grown])
    held = pipe.bokeh(image, maps, settings=FAST_BOKEH)
    raw = pipe.bokeh(image, maps, settings=FAST_BOKEH, hold_unchanged=False)
    # reach of the corner: radius 5 px, grown by the feather (4 px) and faded over 4 more: 13 px
    untouched = torch.ones(48, 48, dtype=torch.bool)
    untouched[:8 + 13, :8 + 13] = False
    assert torch.equal(held[1], held[0])
    assert torch.equal(held[2][untouched], held[1][untouched])
    assert (held[2][:8, :8] - held[1][:8, :8]).abs().max() > 1e-3
    assert torch.equal(held[2][:13, :13], raw[2][:13, :13])  # within the reach: the frame as sampled
    assert (raw[2][untouched] - raw[1][untouched]).abs().max() > 1e-5  # without the hold: everywhere
    # frames from different images are never held: the second frame is its own run
    other = _image(48, 48, seed=5)
    two = pipe.bokeh(torch.cat([image, other]), torch.stack([base, base]), settings=FAST_BOKEH)
    alone = pipe.bokeh(other, base, settings=FAST_BOKEH)
    assert (two[1] - alone[0]).abs().max() < 1e-4  # batched vs single: fp32 summation order


def test_bokeh_depends_on_the_defocus_map(pipe):
    image = _image(32, 32)
    a = pipe.bokeh(image, _defocus(32, 32, scale=5.0), settings=FAST_BOKEH)
    b = pipe.bokeh(image, _defocus(32, 32, scale=80.0), settings=FAST_BOKEH)
    assert (a - b).abs().max() > 1e-4


def test_pre_deblur_variant_black_default_and_resizing(pipe):
    image = _image(32, 48)
    black = pipe.deblur(image, settings=FAST, variant="pre_deblur")
    explicit_black = pipe.deblur(image, pre_deblurred=torch.zeros(1, 32, 48, 3), settings=FAST)
    assert torch.equal(black, explicit_black)
    other = pipe.deblur(image, pre_deblurred=_image(64, 96, seed=3), settings=FAST)  # resized to 32x48
    assert other.shape == (1, 32, 48, 3) and (other - black).abs().max() > 1e-4
    plain = pipe.deblur(image, settings=FAST)
    assert (plain - black).abs().max() > 1e-5
    with pytest.raises(InputError, match="variant"):
        pipe.deblur(image, pre_deblurred=image, settings=FAST, variant="plain")


def test_aperture_condition_uses_its_own_adapter(pipe):
    seen = []
    hooks = [m.lora_A["aperture"].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-2]))
             for m in pipe.transformer.modules() if lora.is_lora_layer(m) and "aperture" in m.lora_A]
    try:
        image, d = _image(32, 48), _defocus(32, 48)
        with_shape = pipe.bokeh(image, d, aperture=SquareAperture(), settings=FAST_BOKEH)
    finally:
        for h in hooks:
            h.remove()
    without = pipe.bokeh(image, d, settings=FAST_BOKEH)
    assert with_shape.shape == (1, 32, 48, 3)
    assert (with_shape - without).abs().max() > 1e-4
    # aperture LoRA runs on the exemplar's 2x3 tokens (and its modulation row), nothing else
    assert seen and set(seen) <= {1, 6}


def test_aperture_in_tiled_mode(pipe):
    image, d = _image(128, 160), _defocus(128, 160)
    settings = SamplerSettings(steps=1, seed=1234, tiled=True, tile_size=8, tile_overlap=2, tile_batch=3)
    out = pipe.bokeh(image, d, aperture=SquareAperture(), settings=settings)
    assert out.shape == (1, 128, 160, 3) and torch.isfinite(out).all()


def test_missing_adapter_names_the_lora_file(tiny_dir):
    transformer, vae = build_tiny(tiny_dir)
    embeddings = {s: PromptEmbedding.from_safetensors(tiny_dir / "prompt_embeds.safetensors", s) for s in ("deblur", "bokeh")}
    p = GenRefocusPipeline(transformer, vae, embeddings)
    with pytest.raises(ModelFileError, match="bokehNet.safetensors"):
        p.bokeh(_image(16, 16), _defocus(16, 16), settings=FAST_BOKEH)
    with pytest.raises(ModelFileError, match="deblurNet.safetensors"):
        p.deblur(_image(16, 16), settings=FAST)
    p.load_lora(tiny_dir / "bokehNet.safetensors", "bokeh")
    with pytest.raises(ModelFileError, match="aperture"):
        p.bokeh(_image(16, 16), _defocus(16, 16), aperture=SquareAperture(), settings=FAST_BOKEH)
    p2 = GenRefocusPipeline(transformer, vae, {"deblur": embeddings["deblur"]})
    with pytest.raises(ModelFileError, match="bokeh"):
        p2.bokeh(_image(16, 16), _defocus(16, 16), settings=FAST_BOKEH)


def test_bad_input(pipe):
    image = _image(32, 32)
    with pytest.raises(InputError):
        pipe.deblur(torch.rand(1, 32, 32, 5), settings=FAST)
    with pytest.raises(InputError, match="steps"):
        pipe.deblur(image, settings=SamplerSettings(steps=0))
    with pytest.raises(InputError, match="must match"):
        pipe.bokeh(image, torch.ones(16, 16), settings=FAST_BOKEH)
    with pytest.raises(InputError, match="batch"):
        pipe.bokeh(_image(32, 32, b=2), torch.ones(3, 32, 32), settings=FAST_BOKEH)
    with pytest.raises(InputError, match="negative"):
        pipe.bokeh(image, -torch.ones(32, 32), settings=FAST_BOKEH)
    with pytest.raises(InputError, match="NaN"):
        pipe.bokeh(image, torch.full((32, 32), float("nan")), settings=FAST_BOKEH)
    with pytest.raises(InputError, match="batch"):
        pipe.deblur(_image(32, 32, b=2), pre_deblurred=_image(32, 32, b=3), settings=FAST)
    with pytest.raises(InputError, match="at least"):
        pipe.deblur(image, settings=SamplerSettings(steps=1, tiled=True))
    with pytest.raises(InputError, match="empty"):
        pipe.deblur(torch.rand(1, 0, 32, 3), settings=FAST)


def test_callback_progress_and_cancel(pipe):
    steps = []
    pipe.deblur(_image(32, 32), settings=SamplerSettings(steps=3, seed=1),
                callback=lambda s, n, lat: steps.append((s, n, tuple(lat.shape))))
    assert steps == [(1, 3, (1, 16, 4, 4)), (2, 3, (1, 16, 4, 4)), (3, 3, (1, 16, 4, 4))]

    def stop(step, total, latents):
        raise Interrupted("stop")

    with pytest.raises(Interrupted):
        pipe.bokeh(_image(32, 32), _defocus(32, 32), settings=FAST_BOKEH, callback=stop)


def test_offloader_stages_are_used(pipe):
    used = []

    class RecordingOffload:
        execution_device = torch.device("cpu")

        @contextmanager
        def stage(self, module, work=None):
            used.append(type(module).__name__)
            yield module

    p = GenRefocusPipeline(pipe.transformer, pipe.vae, pipe.prompt_embeddings, offload=RecordingOffload(),
                           dtype=torch.float32)
    p.deblur(_image(16, 16), settings=SamplerSettings(steps=1, seed=1))
    assert used == ["AutoencoderKL", "FluxTransformer2DModel", "AutoencoderKL"]


def test_stage_table_is_what_loader_node_and_cli_read():
    """Every adapter's option is a load_genrefocus keyword and a CLI flag; its stage exists; the rules hold."""
    import inspect

    from genrefocus_core.cli.generative import build_parser
    from genrefocus_core.generative import stages
    from genrefocus_core.generative.loader import load_genrefocus

    params = inspect.signature(load_genrefocus).parameters
    flags = {a.dest for a in build_parser("refocus")._actions}
    for a in stages.ADAPTERS.values():
        assert a.stage in stages.STAGES and a.option in params and a.option in flags
    assert stages.stages_of(["pre_deblur", "aperture", "bokeh"]) == ["bokeh", "deblur"]
    stages.check_requirements(["aperture", "bokeh"])
    with pytest.raises(InputError, match="bokeh_lora"):
        stages.check_requirements(["aperture", "deblurring"])
    pick = stages.deblur_adapter
    assert pick("auto", ["deblurring", "pre_deblur"], False) == "deblurring"
    assert pick("auto", ["deblurring", "pre_deblur"], True) == "pre_deblur"
    assert pick("auto", ["pre_deblur"], False) == "pre_deblur"
    assert pick("plain", [], False) == "deblurring" and pick("pre_deblur", [], False) == "pre_deblur"
    with pytest.raises(InputError, match="variant"):
        pick("fast", [], False)
