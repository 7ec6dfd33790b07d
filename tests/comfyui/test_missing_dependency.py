"""A missing optional dependency must not take ComfyUI down: with diffusers and peft unimportable (the
standalone core's loaders), the pack still loads and every node registers, the generative ones too (they
run on ComfyUI's own FLUX MODEL), and the classical workflow runs."""
from __future__ import annotations

import pytest

from conftest import PACK_NAME, errors_of, make_base, running_server

pytestmark = pytest.mark.comfyui

GENERATIVE = {"GenRefocusLoadModel", "GenRefocusDeblurNet", "GenRefocusBokehNet", "GenRefocusTiledSampler"}


def test_pack_without_diffusers(tmp_path_factory):
    base = make_base(tmp_path_factory, "comfy-base-nodiffusers")
    hide = tmp_path_factory.mktemp("hide-diffusers")
    for name in ("diffusers", "peft"):
        (hide / name).mkdir()
        (hide / name / "__init__.py").write_text(
            f"raise ImportError('{name} is hidden for this test (simulating an install without it)')\n")
    with running_server(base, {"PYTHONPATH": str(hide)}) as server:
        info = server.object_info()
        ours = {n for n in info if n.startswith("GenRefocus")}
        assert GENERATIVE <= ours, ours
        assert {"GenRefocusScene", "GenRefocusDefocusMap", "GenRefocusClassicalBokeh", "GenRefocusApertureShape",
                "GenRefocusDepthFromImage", "GenRefocusLoadDepthPro"} <= ours
        log = server.log_tail(10**7)
        assert f"(IMPORT FAILED): {base / 'custom_nodes' / PACK_NAME}" not in log
        assert "disabled" not in log, log[-3000:]
        h = server.run(server.workflow_api("Bokeh Lens Blur (classical, no weights).json"))
        assert h["status"]["status_str"] == "success", errors_of(h)
