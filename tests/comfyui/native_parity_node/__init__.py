"""Test-only ComfyUI custom node (never shipped): a parity case of GENREFOCUS_PARITY_DIR run inside the
server on the pack's native path -- Load GenRefocus's output (adapters beside a MODEL from ComfyUI's own
loader) and a ComfyUI VAE. It runs tests/parity_cases.py: (a) the sampler from the case's recorded latents
and condition tokens on the MODEL's diffusion model (after ComfyUI's load_models_gpu, as the stages do),
every step within 1e-4; (b) the stage end to end through the same pipeline DeblurNet/BokehNet build, the
8-bit output within 1/255. The figures go to a JSON file; a failed check fails the node with its message.
It also logs every model file ComfyUI reads through comfy.utils.load_torch_file ("genrefocus-test: read
<path>"), so tests can count how often a graph reads FLUX.
"""
import json
import sys
from pathlib import Path

import logging

import comfy.utils

TESTS = Path(__file__).resolve().parents[2]
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))

_load_torch_file = comfy.utils.load_torch_file


def load_torch_file(ckpt, *args, **kwargs):
    logging.info("genrefocus-test: read %s", ckpt)
    return _load_torch_file(ckpt, *args, **kwargs)


comfy.utils.load_torch_file = load_torch_file


class GenRefocusTestNativeParity:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"genrefocus_model": ("GENREFOCUS_MODEL",), "vae": ("VAE",),
                             "case": ("STRING", {"default": ""}), "report": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, genrefocus_model, vae, case, report):
        import numpy as np
        import torch

        from genrefocus_core.generative.sampling import SequenceSize
        from parity_cases import PARITY_DIR, check_recorded_trajectory, run_end_to_end, uint8_error

        manifest = json.loads((PARITY_DIR / "manifest.json").read_text())
        spec = {c["name"]: c for c in manifest["cases"]}[case]
        z = {k: torch.from_numpy(v) for k, v in np.load(PARITY_DIR / f"{case}.npz").items()}
        pipe = genrefocus_model.pipeline(vae)
        n_cond = sum(1 for k in z if k.startswith("cond") and k.endswith("_tokens"))
        rows, cols = spec["latent_tokens_hw"]
        work = SequenceSize(1, rows * cols, n_cond, z["prompt_embeds"].shape[1])
        with pipe.offload.stage(pipe.transformer, work):
            err_final = check_recorded_trajectory(pipe.transformer, spec, z)
        out = run_end_to_end(pipe, spec, z)
        figures = {"case": case, "final_latents": err_final, "uint8": uint8_error(out, z),
                   "output_float": (out[0] - z["output_float"][0]).abs().max().item(),
                   "dtype": str(genrefocus_model.dtype), "adapters": genrefocus_model.adapters}
        assert figures["uint8"] <= 1, f"{case}: 8-bit output off by {figures['uint8']}/255"
        Path(report).write_text(json.dumps(figures))
        return {}


NODE_CLASS_MAPPINGS = {"GenRefocusTestNativeParity": GenRefocusTestNativeParity}
