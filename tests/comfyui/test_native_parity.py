"""Parity on ComfyUI's own FLUX in a real server: every case of GENREFOCUS_PARITY_DIR with the tiny
transformer written as a BFL single file and loaded by UNETLoader, the tiny VAE by VAELoader, the LoRA
adapters added by Load GenRefocus, run by the test-only node of native_parity_node (the pack's native
path: the same pipeline DeblurNet/BokehNet build). Tolerances are the fixtures' contract (1e-4 on every
step's noise prediction and latents, 1/255 on the 8-bit output): the native path computes the same fp32
algorithm as the reference, differing only in GEMM blocking of the fused layers, ComfyUI's RMS norm and
its VAE implementation (rounding of order 1e-6)."""
import json

import pytest

from conftest import errors_of
from native_flux_setup import NATIVE_FILES, widget_name
from parity_cases import case_names

pytestmark = pytest.mark.comfyui


def parity_graph(case: str, report: str, weight_dtype: str = "default") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": widget_name(NATIVE_FILES["unet"]),
                                                      "weight_dtype": weight_dtype}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": widget_name(NATIVE_FILES["vae"])}},
        "3": {"class_type": "GenRefocusLoadModel", "inputs": {
            "model": ["1", 0], "deblur_lora": "deblurNet.safetensors", "bokeh_lora": "bokehNet.safetensors",
            "pre_deblur_lora": "deblurNet.safetensors", "aperture_lora": "none",
            "prompt_embeddings": "prompt_embeds.safetensors"}},
        "4": {"class_type": "GenRefocusTestNativeParity", "inputs": {
            "genrefocus_model": ["3", 0], "vae": ["2", 0], "case": case, "report": report}},
    }


@pytest.mark.parametrize("case_name", case_names())
def test_native_parity(server, case_name, tmp_path):
    report = tmp_path / f"{case_name}.json"
    h = server.run(parity_graph(case_name, str(report)))
    assert h["status"]["status_str"] == "success", json.dumps(errors_of(h))[:3000]
    figures = json.loads(report.read_text())
    print(f"native {case_name}: {figures}")
    assert figures["final_latents"] < 1e-4 and figures["uint8"] <= 1, figures
    assert figures["dtype"] == "torch.float32"
