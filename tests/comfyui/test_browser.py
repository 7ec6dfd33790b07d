"""ComfyUI's real front end in headless Debian chromium, driven by playwright-core (browser_check.js):
every shipped workflow loads with no "Some Nodes Are Missing" dialog and the front end's own API
conversion equals the one the server tests use; clicking the Defocus Map preview sets the focus; each
workflow opened in a 1600x1000 window shows its note and every node inside the view; on a server without
the model files the missing-models list names each file and its folder (when opening and when queuing);
the template browser shows a thumbnail and the whole readable title (the file name) for every workflow;
the node search finds the pack by artist words and a Tiled Sampler added through it keeps a fixed seed;
the Defocus Map preview survives a page reload.

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

from conftest import PACK_NAME, WORKFLOWS, make_base, running_server
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
               WORKFLOWS / "Bokeh Lens Blur (classical, no weights).json", env=env)
    assert r["missing"] is None
    assert r["before"]["focus_x"] == pytest.approx(0.2) and r["before"]["focus_y"] == pytest.approx(0.72)
    # the driver clicks at 25 % of the preview's width and 75 % of its height
    assert r["after"]["focus_x"] == pytest.approx(0.25, abs=0.01), r
    assert r["after"]["focus_y"] == pytest.approx(0.75, abs=0.01), r
    assert r["after"]["focus_mode"] == "point"
    assert r["after"]["focus_distance_m"] == 0, r  # the click replaced the distance focus set before the run


def _overlap(a, b) -> float:
    """Area shared by two screen rectangles [left, top, right, bottom]."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def test_every_workflow_opens_with_its_note_and_nodes_inside_the_view(comfy_server, tmp_path):
    """At the default window size (1600x1000) and each workflow's stored view: every node, title bar
    included, lies on the canvas, off the minimap and the zoom buttons, apart from the other nodes, at a
    scale where titles are readable (with GENREFOCUS_SCREENSHOTS=<dir>, <dir>/stored_view/ keeps the
    screenshots that tools/workflow_thumbnails.py makes the thumbnails of)."""
    env = _browser_env()
    if os.environ.get("GENREFOCUS_SCREENSHOTS"):  # for tools/workflow_thumbnails.py
        env["SHOTS"] = str(Path(os.environ["GENREFOCUS_SCREENSHOTS"]) / "stored_view")
        Path(env["SHOTS"]).mkdir(parents=True, exist_ok=True)
    files = sorted(WORKFLOWS.glob("*.json"))
    result = _drive("view", comfy_server, tmp_path / "view.json", *files, env=env)
    for f in files:
        r = result[f.name]
        assert r["missing"] is None, f"{f.name}: {r['missing']}"
        left, top, right, bottom = r["canvas"]
        assert (right - left, bottom - top) == (1536, 922), r["canvas"]  # the layout the tools assume
        assert len(r["overlays"]) >= 1, "the minimap / zoom buttons were not found"
        assert r["font_px"] >= 10, f"{f.name}: titles drawn at {r['font_px']:.1f} px"
        nodes = r["nodes"]
        assert any(n["type"] in ("MarkdownNote", "Note") for n in nodes), f.name
        for n in nodes:
            l, t, rr, b = n["rect"]
            where = f"{f.name}: {n['title']} at {[round(v) for v in n['rect']]}"
            assert l >= left - 0.5 and t >= top - 0.5 and rr <= right + 0.5 and b <= bottom + 0.5, where + " leaves the canvas"
            for o in r["overlays"]:
                assert _overlap(n["rect"], o) == 0, where + f" is under {[round(v) for v in o]}"
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                assert _overlap(a["rect"], b["rect"]) == 0, f"{f.name}: {a['title']} overlaps {b['title']}"


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    """A server with the pack and no model files at all (a new user's install)."""
    base = make_base(tmp_path_factory, "comfy-bare")
    with running_server(base) as server:
        yield server


def test_missing_models_are_listed_with_their_folders(bare_server, tmp_path):
    """Opening a generative workflow without its files lists each file as '<folder> / <name>' (from the
    nodes' properties.models), and so does queuing it; the pack's loaders are not among the nodes that
    fail validation (they accept the names and say what to do at run time)."""
    env = _browser_env()
    wf = WORKFLOWS / "Refocus a Photo (DeblurNet, BokehNet).json"
    r = _drive("missing", bare_server, tmp_path / "missing.json", wf, env=env)
    assert r["missing_nodes"] is None
    expected = {(m["directory"], m["name"]) for n in json.loads(wf.read_text())["nodes"]
                for m in n.get("properties", {}).get("models", [])}
    assert {("genrefocus", "bokehNet.safetensors"), ("depth_pro", "depth_pro.pt"),
            ("diffusion_models", "flux1-dev.safetensors")} <= expected
    for directory, name in expected:
        assert f"{directory} / {name}" in r["dialog"], (directory, name, r["dialog"][:2000])
        assert f"{directory} / {name}" in r["after_queue"], (directory, name, r["after_queue"][:3000])
    assert "Missing Models" in r["after_queue"]
    failing = {e["class_type"] for e in (r["node_errors"] or {}).values()}
    assert not failing & {"GenRefocusLoadModel", "GenRefocusLoadDepthPro"}, r["node_errors"]


def test_loaders_name_every_missing_file_at_run_time(bare_server):
    """Without any file (names left as shipped): ComfyUI's own FLUX and VAE loaders fail validation naming
    their files (the front end's missing-models dialog lists them from properties.models, with folder and
    link), and the pack's loader is not among them: it accepts the LoRA names and, given a MODEL, says at
    run time which file goes in which folder and where to download it (checked below on the tiny MODEL)."""
    api = bare_server.workflow_api("Sharpen a Blurry Photo (DeblurNet).json")
    api = {k: v for k, v in api.items() if v["class_type"] != "DualCLIPLoader"}
    loader = next(v for v in api.values() if v["class_type"] == "GenRefocusLoadModel")
    loader["inputs"].pop("clip", None)
    image = next(v for v in api.values() if v["class_type"] == "LoadImage")
    from PIL import Image
    Image.new("RGB", (32, 32)).save(bare_server.base / "input" / image["inputs"]["image"])
    st, resp = bare_server.post_prompt(api)
    assert st == 400, resp
    failing = {e["class_type"]: json.dumps(e["errors"]) for e in resp["node_errors"].values()}
    assert set(failing) == {"UNETLoader", "VAELoader"}, failing
    assert "flux1-dev.safetensors" in failing["UNETLoader"] and "ae.safetensors" in failing["VAELoader"]


def test_lora_loader_names_a_missing_file_at_run_time(comfy_server):
    """A released LoRA named but not installed (the tiny server has no pre-deblur file): the loader's error
    names it, its folder and its download link."""
    api = comfy_server.workflow_api("Sharpen a Blurry Photo (DeblurNet).json", tiny=True)
    loader = next(v for v in api.values() if v["class_type"] == "GenRefocusLoadModel")
    loader["inputs"]["pre_deblur_lora"] = "deblurNet_with_pre_deblur.safetensors"
    image = next(v for v in api.values() if v["class_type"] == "LoadImage")
    image["inputs"]["image"] = "missing_lora_test.png"  # example.png stays the scene other tests use
    from PIL import Image
    Image.new("RGB", (32, 32)).save(comfy_server.base / "input" / image["inputs"]["image"])
    from conftest import errors_of
    h = comfy_server.run(api)
    (err,) = errors_of(h)
    assert err["node_type"] == "GenRefocusLoadModel", err
    msg = err["exception_message"]
    assert "deblurNet_with_pre_deblur.safetensors" in msg and str(comfy_server.base / "models" / "genrefocus") in msg
    assert "https://huggingface.co/nycu-cplab/Genfocus-Model/resolve/main/deblurNet_with_pre_deblur.safetensors" in msg


def test_template_browser_shows_a_thumbnail_for_every_workflow(comfy_server, tmp_path):
    env = _browser_env()
    r = _drive("templates", comfy_server, tmp_path / "templates.json", PACK_NAME, env=env)
    names = {f.stem for f in WORKFLOWS.glob("*.json")}
    assert set(r["requests"]) == names
    for name, got in r["requests"].items():
        assert got["status"] == 200 and got["type"] == "image/jpeg" and got["bytes"] > 5000, (name, got)
    # front end 1.27 titles a pack's card with the file name and repeats it below with '-'/'_' as spaces: the
    # files are named as titles (tests/test_workflow_guidance.py), shown whole and twice the same
    cards = {c["name"]: c for c in r["cards"] if c["name"] in names}
    assert set(cards) == names, (r["category_found"], r["cards"])
    for name, card in cards.items():
        assert card["loaded"], card
        assert card["title"] == card["alt"] == card["description"] == name and "_" not in name, card
        assert not card["title_cut"], card


def test_search_finds_the_pack_by_artist_words_and_new_samplers_keep_a_fixed_seed(comfy_server, tmp_path):
    env = _browser_env()
    r = _drive("search", comfy_server, tmp_path / "search.json", "bokeh", "lens blur", "depth of field", "DOF",
               "tilt-shift", env=env)
    q = r["queries"]
    assert q["bokeh"][0].startswith("Bokeh Lens Blur"), q["bokeh"]  # the classical renderer before BokehNet
    assert any("BokehNet" in t for t in q["bokeh"]), q["bokeh"]
    assert q["lens blur"][0].startswith("Bokeh Lens Blur"), q["lens blur"]
    assert q["depth of field"] and "Depth of Field" in q["depth of field"][0], q["depth of field"]
    assert q["DOF"] and q["DOF"][0].startswith("Bokeh Lens Blur, DOF"), q["DOF"]
    assert q["tilt-shift"] and "Tilt-Shift" in q["tilt-shift"][0], q["tilt-shift"]
    # the front end's default for a "seed" input is "randomize": a new sampler must start fixed
    assert r["added"][0].startswith("Tiled Sampler"), r["added"]
    assert r["sampler"] == {"seed": 1234, "control": "fixed"}, r["sampler"]


def test_defocus_preview_survives_a_page_reload(comfy_server, tmp_path):
    env = _browser_env()
    r = _drive("reload", comfy_server, tmp_path / "reload.json",
               WORKFLOWS / "Bokeh Lens Blur (classical, no weights).json", env=env)
    assert r["missing"] is None
    assert "GenRefocusDefocusMap" in r["nodes_after_reload"]
    assert r["before_reload"] and r["after_reload"], r
