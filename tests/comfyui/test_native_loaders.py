"""ComfyUI's own FLUX loaders on the tiny model, in a real server: UNETLoader (default and fp8_e4m3fn weights),
CheckpointLoaderSimple, ComfyUI-GGUF's UnetLoaderGGUF (Q8_0, Q4_0), each followed by a plain KSampler step
and VAEDecode with the tiny VAE loaded by VAELoader (or from the checkpoint).

One euler step of the "simple" schedule goes from sigma 1 to 0, so the saved latent is exactly
(noise - v) / 0.3611 + 0.1159 with v = the transformer's prediction for the seed's noise at t = 1 (FLUX's
latent format; ComfyUI draws the noise with torch.manual_seed(seed) on the CPU). The test recomputes v with
the diffusers tiny transformer and compares:
- fp32 files: within 1e-4 (both fp32; only summation order and the attention/rotary kernels differ, errors
  ~1e-6 on values of order 1);
- fp8 / GGUF: the deviation from the fp32 prediction is printed and bounded relative to max|v|, and must
  not be zero (the quantised weights are really in use). Weight errors (tests/test_flux_files.py): fp8
  e4m3 rounds to 3 mantissa bits (<= 6.3 % of each weight), Q8_0 < 0.45 % and Q4_0 < 12.7 % of the block's
  largest weight; through the 4 blocks of the tiny model they stay below BOUNDS.
The image: ComfyUI's VAEDecode of that latent against the diffusers tiny VAE's decode of the same latent,
within 1/255 (both fp32; SaveImage truncates to 8 bits, which turns a difference of 1e-6 into at most 1),
and VAEEncode of the server's input image against the diffusers posterior mean within 1e-4 (fp32).
"""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import errors_of
from native_flux_setup import LOADER_KINDS, gguf_missing_reason, native_loader_nodes

pytestmark = pytest.mark.comfyui

SEED, HEIGHT, WIDTH = 7, 48, 64  # 6x8 latent: non-square, so a row/column mix-up shows
GUIDANCE = 3.5
SCALE, SHIFT = 0.3611, 0.1159  # ComfyUI's FLUX latent format (= the tiny VAE's config)
BOUNDS = {"unet-fp8_e4m3fn": 0.15, "gguf-Q8_0": 0.02, "gguf-Q4_0": 0.3}  # max|dv| / max|v|


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    from tiny_flux import build_tiny
    return build_tiny(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_models):
    """noise and the diffusers tiny transformer's prediction v at t = 1, guidance 3.5, the deblur prompt."""
    from genrefocus_core.generative.condition_tokens import pack_latents, position_ids, unpack_latents

    transformer, _ = tiny_models
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(SEED))
    e = load_file(str(tiny_dir / "prompt_embeds.safetensors"))
    rows, cols = HEIGHT // 16, WIDTH // 16
    with torch.no_grad():
        v = transformer(hidden_states=pack_latents(noise), encoder_hidden_states=e["deblur_prompt_embeds"],
                        pooled_projections=e["deblur_pooled_prompt_embeds"], timestep=torch.tensor([1.0]),
                        guidance=torch.tensor([GUIDANCE]), img_ids=position_ids(rows, cols),
                        txt_ids=torch.zeros(e["deblur_prompt_embeds"].shape[1], 3), return_dict=False)[0]
    return noise, unpack_latents(v, rows, cols)


def step_graph(kind: str) -> dict:
    nodes, model, vae = native_loader_nodes(kind)
    prefix = f"native_{kind}"
    nodes.update({
        "1": {"class_type": "TinyFluxPromptConditioning", "inputs": {"stage": "deblur"}},
        "2": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["1", 0], "guidance": GUIDANCE}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": vae}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": vae}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": prefix + "_encoded"}},
    })
    return nodes


def saved_latent(server, history, node_id: str) -> torch.Tensor:
    (item,) = history["outputs"][node_id]["latents"]
    return load_file(str(server.base / item["type"] / item["subfolder"] / item["filename"]))["latent_tensor"]


@pytest.mark.parametrize("kind", LOADER_KINDS)
def test_tiny_flux_through_comfyui_loaders(server, reference, tiny_models, kind):
    if kind.startswith("gguf-") and gguf_missing_reason():
        pytest.skip(gguf_missing_reason())
    history = server.run(step_graph(kind))
    assert not errors_of(history), errors_of(history)
    latent = saved_latent(server, history, "5")
    noise, v_ref = reference
    assert latent.shape == noise.shape
    v = noise - (latent.float() - SHIFT) * SCALE
    deviation = (v - v_ref).abs().max().item() / v_ref.abs().max().item()
    print(f"{kind}: max|v - v_fp32| / max|v_fp32| = {deviation:.2e}")
    if kind in BOUNDS:
        assert 0 < deviation < BOUNDS[kind]
    else:
        assert (v - v_ref).abs().max() < 1e-4

    _, vae = tiny_models
    with torch.no_grad():
        want = ((vae.decode(latent.float()).sample + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    (image,) = server.outputs_of(history, "7")
    got = server.image(image).astype(np.int16)
    assert got.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(got - (want * 255).astype(np.int16)).max() <= 1

    # VAEEncode gives the posterior mean (ComfyUI's encoder does not sample), unscaled
    pixels = torch.from_numpy(np.array(Image.open(server.base / "input" / "example.png").convert("RGB")))
    with torch.no_grad():
        mean = vae.encode(pixels.permute(2, 0, 1)[None].float() / 255 * 2 - 1).latent_dist.mean
    assert (saved_latent(server, history, "10") - mean).abs().max() < 1e-4
