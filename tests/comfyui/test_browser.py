"""ComfyUI's real front end in headless Debian chromium, driven by playwright-core (browser_check.js):
every shipped workflow loads with no "Some Nodes Are Missing" dialog and the front end's own API
conversion equals the one the server tests use; clicking the Defocus Map preview sets the focus.

Needs: COMFYUI_DIR (server), `node`, chromium (apt-get install -y chromium; CHROMIUM overrides the
path) and playwright-core (npm install playwright-core, in a cache folder named by GENREFOCUS_NODE_PATH
= its node_modules; default ~/.cache/genrefocus-playwright/node_modules). Set GENREFOCUS_SCREENSHOTS to
a folder to keep a screenshot of each loaded workflow (docs/img is made that way).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import WORKFLOWS
from ui_to_api import convert

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]
HERE = Path(__file__).resolve().parent


def _browser_env() -> dict:
    node_path = Path(os.environ.get("GENREFOCUS_NODE_PATH",
                                    Path.home() / ".cache" / "genrefocus-playwright" / "node_modules"))
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    missing = []
    if shutil.which("node") is None:
        missing.append("node (Node.js)")
    if not Path(chromium).exists():
        missing.append(f"chromium at {chromium} (apt-get install -y chromium)")
    if not (node_path / "playwright-core").is_dir():
        missing.append(f"playwright-core in {node_path} (npm install playwright-core; set GENREFOCUS_NODE_PATH)")
    if missing:
        pytest.skip("browser test needs " + ", ".join(missing))
    env = dict(os.environ, NODE_PATH=str(node_path), CHROMIUM=chromium)
    return env


def _drive(mode: str, server, out: Path, *files, env=None, timeout=600):
    cmd = ["node", str(HERE / "browser_check.js"), mode, server.url, str(out), *map(str, files)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"browser driver failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_every_workflow_loads_without_missing_nodes(comfy_server, tmp_path):
    env = _browser_env()
    shots = os.environ.get("GENREFOCUS_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        env["SHOTS"] = shots
    files = sorted(WORKFLOWS.glob("*.json"))
    assert len(files) >= 5
    result = _drive("load", comfy_server, tmp_path / "load.json", *files, env=env)
    info = comfy_server.object_info()
    for f in files:
        r = result[f.name]
        assert r["missing"] is None, f"{f.name}: {r['missing']}"
        ui = json.loads(f.read_text())
        assert sorted(r["nodes"]) == sorted(n["type"] for n in ui["nodes"]), f.name
        # the front end's own UI -> API conversion equals the one the server tests rely on
        ours = convert(ui, info)
        theirs = r["prompt"]
        assert set(ours) == set(theirs), f.name
        for nid in ours:
            assert ours[nid]["class_type"] == theirs[nid]["class_type"]
            assert ours[nid]["inputs"] == theirs[nid]["inputs"], (f.name, nid)


def test_clicking_the_preview_sets_the_focus(comfy_server, tmp_path):
    env = _browser_env()
    if os.environ.get("GENREFOCUS_SCREENSHOTS"):
        env["SHOTS"] = os.environ["GENREFOCUS_SCREENSHOTS"]
    r = _drive("picker", comfy_server, tmp_path / "picker.json",
               WORKFLOWS / "genrefocus_classical_shaped_bokeh.json", env=env)
    assert r["missing"] is None
    assert r["before"]["focus_x"] == pytest.approx(0.2) and r["before"]["focus_y"] == pytest.approx(0.72)
    # the driver clicks at 25 % of the preview's width and 75 % of its height
    assert r["after"]["focus_x"] == pytest.approx(0.25, abs=0.01), r
    assert r["after"]["focus_y"] == pytest.approx(0.75, abs=0.01), r
    assert r["after"]["focus_mode"] == "point"
