"""FLUX loaded once: the text-to-image -> refocus workflow in a fresh real server on the tiny weights. Its one
UNETLoader feeds ComfyUI's KSampler and Load GenRefocus, so one queue reads the FLUX file once (counted by the
test-only node's log of comfy.utils.load_torch_file) and holds one copy: the server's peak RSS for the whole
graph is compared with the text-to-image half alone (peaks reset through /proc/<pid>/clear_refs between runs)."""
import json

import pytest

from conftest import _place_models, errors_of, make_base, running_server
from native_flux_setup import NATIVE_FILES, install_native_flux, widget_name

pytestmark = pytest.mark.comfyui


def _reads(server, name: str) -> int:
    return sum(1 for line in server.log_tail(10**8).splitlines() if "genrefocus-test: read" in line and name in line)


def _peak_rss(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak(server) -> None:
    with open(f"/proc/{server.proc.pid}/clear_refs", "w") as f:
        f.write("5")


def test_txt2img_refocus_loaded_once(tmp_path_factory, tiny_dir):
    from test_server import txt2img_tiny
    from tiny_depth_pro import build_tiny_depth_pro

    base = make_base(tmp_path_factory, "comfy-base-loaded-once")
    _place_models(base / "models", tiny_dir, build_tiny_depth_pro)
    env = install_native_flux(base, tiny_dir)
    unet = widget_name(NATIVE_FILES["unet"]).rsplit("/", 1)[-1]
    with running_server(base, extra_env=env) as server:
        api = txt2img_tiny(server)
        _reset_peak(server)
        h = server.run(api)
        assert h["status"]["status_str"] == "success", json.dumps(errors_of(h))[:3000]
        assert _reads(server, unet) == 1, server.log_tail()
        peak_full = _peak_rss(server)
        # the text-to-image half alone, after ComfyUI's "free model and node cache"
        st, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
        assert st == 200
        # ComfyUI's worker applies the flags after the next prompt it runs: a small one that needs no FLUX
        scene = {"1": {"class_type": "GenRefocusScene", "inputs": {"width": 64, "height": 48, "seed": 1}},
                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        assert server.run(scene)["status"]["status_str"] == "success"
        half_types = {"UNETLoader", "VAELoader", "TinyFluxPromptConditioning", "FluxGuidance", "ConditioningZeroOut",
                      "EmptySD3LatentImage", "KSampler", "VAEDecode", "PreviewImage"}
        half = {k: v for k, v in api.items() if v["class_type"] in half_types}
        _reset_peak(server)
        h = server.run(half)
        assert h["status"]["status_str"] == "success", json.dumps(errors_of(h))[:3000]
        peak_half = _peak_rss(server)
        assert _reads(server, unet) == 2  # read again after the free: nothing else holds it
    print(f"peak RSS: text-to-image + refocus {peak_full / 2**20:.1f} MiB, text-to-image alone "
          f"{peak_half / 2**20:.1f} MiB")
    # one FLUX either way; the refocus half adds Depth Pro (tiny) and its activations, not a second FLUX
    assert peak_full < peak_half + 256 * 2**20
