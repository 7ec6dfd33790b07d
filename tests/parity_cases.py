"""The parity cases of GENREFOCUS_PARITY_DIR (fixtures README), runnable on any model and pipeline:
by the core tests (tests/test_parity.py, tests/test_flux_layouts.py) and inside a real ComfyUI server
(tests/comfyui/native_parity_node, which imports this file; so: no pytest here)."""
import json
import os
import re
from pathlib import Path

import torch

from genrefocus_core.basics import defocus
from genrefocus_core.basics.images import resize_map
from genrefocus_core.generative.multi_branch_forward import prepare_constants
from genrefocus_core.generative.sampling import DenoiseInputs, SamplerSettings, denoise

PARITY_DIR = Path(os.environ.get("GENREFOCUS_PARITY_DIR",
                                 Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "parity"))
KINDS = ("deblur", "pre_deblur", "bokeh")
# adapter name our pipeline uses for each kind
KIND_ADAPTER = {"deblur": "deblurring", "pre_deblur": "pre_deblur", "bokeh": "bokeh"}
DEFAULT_LORA_FILE = {"deblur": "deblurNet.safetensors", "pre_deblur": "deblurNet.safetensors",
                     "bokeh": "bokehNet.safetensors"}


def case_names():
    manifest = PARITY_DIR / "manifest.json"
    if not manifest.exists():
        return ["<no manifest.json: set GENREFOCUS_PARITY_DIR>"]
    return [c["name"] for c in json.loads(manifest.read_text())["cases"]]


def _seed_from(text, default):
    m = re.search(r"manual_seed\((\d+)\)", text or "")
    return int(m.group(1)) if m else default


def _global_seed(case):
    m = re.search(r"seed_everything\((\d+)\)", case.get("official_call", ""))
    return int(m.group(1)) if m else 42


def check_recorded_trajectory(transformer, case, z) -> float:
    """Run the sampler from the case's recorded initial latents and condition tokens on `transformer`
    (a diffusers model or a layout adapter); every step's noise prediction and latents and the final
    latents must be within 1e-4 of the recording. Returns the final latents' max deviation."""
    from genrefocus_core.generative.condition_tokens import pack_latents

    name, kind, steps = case["name"], case["kind"], case["steps"]
    rows, cols = case["latent_tokens_hw"]
    assert rows * cols == case["image_seq_len"] == z["init_latents"].shape[1]
    n_cond = sum(1 for k in z if re.fullmatch(r"cond\d+_tokens", k))
    assert n_cond == {"deblur": 1, "pre_deblur": 2, "bokeh": 2}[kind]
    cond_tokens = [z[f"cond{i}_tokens"] for i in range(n_cond)]
    cond_ids = [z[f"cond{i}_ids"] for i in range(n_cond)]
    predictions, step_latents = [], []
    settings = SamplerSettings(steps=steps, tiled=bool(case["tiled"]))
    with torch.no_grad():
        constants = prepare_constants(transformer, z["prompt_embeds"], z["pooled_prompt_embeds"], cond_tokens,
                                      [(KIND_ADAPTER[kind],)] * n_cond, torch.float32)
        inputs = DenoiseInputs(constants, z["text_ids"], rows, cols, cond_ids, [True] * n_cond,
                               float(case["guidance_scale"]))
        final = denoise(transformer, z["init_latents"], inputs, settings,
                        callback=lambda step, total, lat: step_latents.append(lat.clone()),
                        prediction_hook=lambda i, pred: predictions.append(pred.clone()))
    assert len(predictions) == len(step_latents) == steps
    for i in range(steps):
        err_pred = (predictions[i] - z["step_noise_pred"][i]).abs().max().item()
        err_lat = (pack_latents(step_latents[i]) - z["step_latents"][i]).abs().max().item()
        assert err_pred < 1e-4, f"{name} step {i}: noise prediction off by {err_pred:.3g}"
        assert err_lat < 1e-4, f"{name} step {i}: latents off by {err_lat:.3g}"
    err_final = (final - z["final_latents"]).abs().max().item()
    assert err_final < 1e-4, f"{name}: final latents off by {err_final:.3g}"
    return err_final


def uint8_error(out, z) -> int:
    """Max deviation of the 8-bit rounding of `out` [1, H, W, 3] from the case's output_uint8."""
    out_uint8 = (out[0].clamp(0, 1) * 255).round().to(torch.uint8)
    return (out_uint8.int() - z["output_uint8"].int()).abs().max().item()


def run_end_to_end(pipe, case, z):
    """The case end to end from its input image (and depth, through defocus.py, for bokeh) on `pipe`
    with the reference RNG protocol -> output [1, H, W, 3]."""
    kind, steps, tiled = case["kind"], case["steps"], bool(case["tiled"])
    H, W = case["height"], case["width"]
    image = z["input_uint8"]
    global_seed = _global_seed(case)
    if kind == "bokeh":
        depth = resize_map(z["depth_raw"][None].float(), (H, W))
        assert (depth[0] - z["depth_resized"]).abs().max().item() < 1e-4 * max(1.0, z["depth_resized"].abs().max().item())
        disparity = defocus.disparity_from_depth(depth)
        assert torch.allclose(disparity[0], z["disparity"], rtol=1e-5, atol=1e-6)
        fx, fy = case["focus_point_xy"]
        disp_focus = defocus.focus_disparity(disparity, point=(fx, fy))
        assert abs(disp_focus.item() - case["disp_focus"]) < 1e-6
        defocus_px = defocus.defocus_map(disparity, disp_focus, case["K"])
        cond_map = defocus.network_condition(defocus_px)
        assert (cond_map - z["cond_map"]).abs().max().item() < 1e-5
        seed = _seed_from(case.get("latents_rng"), 1234)
        settings = SamplerSettings(steps=steps, seed=seed, rng="reference", reference_global_seed=global_seed,
                                   tiled=tiled)
        out = pipe.bokeh(image, defocus_px, settings=settings)
    else:
        settings = SamplerSettings(steps=steps, seed=None, rng="reference", reference_global_seed=global_seed,
                                   tiled=tiled)
        if kind == "pre_deblur":
            out = pipe.deblur(image, pre_deblurred=z["pre_deblur_uint8"], settings=settings, variant="pre_deblur")
        else:
            out = pipe.deblur(image, settings=settings, variant="plain")
    return out
