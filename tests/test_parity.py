"""Parity with the official GenRefocus inference, on the fixtures' tiny random FLUX.

Contract (fixtures README): every case of GENREFOCUS_PARITY_DIR/manifest.json runs, parametrized by
its name, dispatching on `kind` (deblur, pre_deblur, bokeh; anything else fails) and `tiled`:
(a) from the recorded initial latents and condition tokens: each step's noise prediction and latents
    and the final latents within 1e-4;
(b) end to end from the input image (and depth for bokeh, through defocus.py) with the reference RNG
    protocol: the 8-bit output within 1/255.
"""
import json

import numpy as np
import pytest
import torch

from genrefocus_core.generative import lora
from genrefocus_core.generative.pipeline import GenRefocusPipeline
from genrefocus_core.generative.prompt_embedding import PromptEmbedding
from parity_cases import (DEFAULT_LORA_FILE, KIND_ADAPTER, KINDS, case_names, check_recorded_trajectory,
                          run_end_to_end, uint8_error)
from tiny_flux import build_tiny


@pytest.fixture(scope="module")
def manifest(parity_dir):
    return json.loads((parity_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_pipeline(parity_dir, tiny_dir, manifest):
    transformer, vae = build_tiny(tiny_dir)
    for case in manifest["cases"]:
        kind = case["kind"]
        if kind in KIND_ADAPTER and KIND_ADAPTER[kind] not in lora.loaded_adapters(transformer):
            lora.load_lora(transformer, tiny_dir / case.get("lora_file", DEFAULT_LORA_FILE[kind]), KIND_ADAPTER[kind])
    embeddings = {s: PromptEmbedding.from_safetensors(tiny_dir / "prompt_embeds.safetensors", s)
                  for s in ("deblur", "bokeh")}
    return GenRefocusPipeline(transformer, vae, embeddings, device="cpu", dtype=torch.float32)



@pytest.mark.parametrize("case_name", case_names())
def test_parity(case_name, parity_dir, manifest, tiny_pipeline):
    cases = {c["name"]: c for c in manifest["cases"]}
    assert case_name in cases, f"case {case_name} not in {parity_dir / 'manifest.json'}"
    case = cases[case_name]
    kind = case["kind"]
    assert kind in KINDS, f"unknown case kind {kind!r} in case {case_name}"
    z = {k: torch.from_numpy(v) for k, v in np.load(parity_dir / f"{case_name}.npz").items()}
    pipe = tiny_pipeline
    H, W = case["height"], case["width"]

    # ---- (a) sampler from the recorded initial latents and condition tokens
    err_final = check_recorded_trajectory(pipe.transformer, case, z)

    # ---- (b) end to end from the input image with the reference RNG protocol
    out = run_end_to_end(pipe, case, z)
    assert out.shape == (1, H, W, 3)
    err_float = (out[0] - z["output_float"][0]).abs().max().item()
    err_uint8 = uint8_error(out, z)
    print(f"{case_name}: final latents {err_final:.2e}, output float {err_float:.2e}, uint8 {err_uint8}")
    assert err_uint8 <= 1, f"{case_name}: 8-bit output off by {err_uint8}/255 (float {err_float:.3g})"
