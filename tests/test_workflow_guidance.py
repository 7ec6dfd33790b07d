"""What guides a new user, without ComfyUI: model metadata for the missing-models dialog on every node
that names a model file, loaders that accept a name not installed yet and then say which file goes in
which folder (and where to download it), workflow names that read as titles in the template browser, and the
search words artists use."""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import workflow_models  # noqa: E402

from nodes.model_catalog import MODEL_FILES, looks_like_model_file  # noqa: E402


def test_every_model_file_a_workflow_names_has_metadata():
    files = sorted((ROOT / "workflows").glob("*.json"))
    assert files
    named = 0
    for path in files:
        ui = json.loads(path.read_text())
        assert workflow_models.problems(ui) == [], f"{path.name}: run python tools/workflow_models.py"
        for node in ui["nodes"]:
            for m in node.get("properties", {}).get("models", []):
                assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"])
                named += 1
    assert named >= 20  # the four generative workflows name 5-8 files each


def test_workflow_file_names_are_the_template_browser_titles():
    """ComfyUI's template browser titles a pack's card with the workflow's file name (front end 1.27 and newer:
    no other title source for custom nodes) and repeats it below with '-' and '_' turned into spaces. So the
    names are titles: a capital first, then only letters, digits, spaces, commas and parentheses (the front end
    puts the name into URLs unencoded; safe on every file system), at most 47 characters (two lines of a
    1.27 card, checked in the real front end by tests/comfyui/test_browser.py). In name order the workflows
    that need no model file come first."""
    files = sorted((ROOT / "workflows").glob("*.json"))
    needs_files = []
    for path in files:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9 ,()]{9,46}", path.stem), path.name
        assert path.with_suffix(".jpg").is_file(), path.name
        nodes = json.loads(path.read_text())["nodes"]
        needs_files.append(any(n.get("properties", {}).get("models") for n in nodes))
    assert not needs_files[0] and needs_files == sorted(needs_files), list(zip(needs_files, files))


def test_the_check_catches_a_file_without_metadata():
    ui = {"nodes": [{"id": 1, "type": "UNETLoader", "widgets_values": ["flux1-dev.safetensors", "default"]},
                    {"id": 2, "type": "X", "widgets_values": ["my_own.safetensors", 3]}]}
    assert len(workflow_models.problems(ui)) == 2
    workflow_models.stamp(ui)
    assert ui["nodes"][0]["properties"]["models"] == [MODEL_FILES["flux1-dev.safetensors"].metadata()]
    (left,) = workflow_models.problems(ui)
    assert "my_own.safetensors" in left and "model_catalog" in left
    assert looks_like_model_file("depth_pro.pt") and not looks_like_model_file("example.png")


@pytest.fixture
def bridge(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFOCUS_MODELS_DIR", str(tmp_path))
    return importlib.import_module("nodes.comfy_bridge")


def test_missing_files_are_named_with_folder_and_download(bridge, tmp_path):
    from genrefocus_core.basics.errors import MissingModelFileError
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "ae.safetensors").write_bytes(b"x")
    with pytest.raises(MissingModelFileError) as e:
        bridge.require_model_files([("diffusion_models", "flux1-dev.safetensors"), ("vae", "ae.safetensors"),
                                    ("genrefocus", "none"), ("genrefocus", "bokehNet.safetensors")])
    msg = str(e.value)
    assert "'flux1-dev.safetensors': put it in " + str(tmp_path / "diffusion_models") in msg
    assert "'bokehNet.safetensors': put it in " + str(tmp_path / "genrefocus") in msg
    assert MODEL_FILES["bokehNet.safetensors"].url in msg and "ae.safetensors" not in msg
    with pytest.raises(MissingModelFileError, match=r"Model file 'depth_pro.pt' not found\. Put it in .*depth_pro"):
        bridge.model_path("depth_pro", "depth_pro.pt")
    bridge.require_model_files([("vae", "ae.safetensors"), ("genrefocus", "none")])  # all there: no error


def test_loaders_accept_names_that_are_not_installed_yet():
    """ComfyUI skips its "Value not in list" check for inputs that VALIDATE_INPUTS takes, so a workflow
    naming files not installed yet reaches the loader's own message."""
    pytest.importorskip("diffusers")
    from nodes.depth_pro_nodes import GenRefocusLoadDepthPro
    from nodes.generative_nodes import GenRefocusLoadModel
    import inspect
    for cls in (GenRefocusLoadModel, GenRefocusLoadDepthPro):
        combos = {k for k, v in cls.INPUT_TYPES()["required"].items()
                  if isinstance(v[0], list) and k != "memory_mode" and k != "precision"}
        assert combos == set(inspect.signature(cls.VALIDATE_INPUTS).parameters), cls
        assert cls.VALIDATE_INPUTS(**{k: "not-installed.safetensors" for k in combos}) is True


def test_artist_words_find_the_classical_renderer_first():
    from nodes import collect_nodes
    from nodes.search_aliases import ARTIST_WORDS
    classes, names, _ = collect_nodes()
    for node in ("GenRefocusClassicalBokeh", "GenRefocusDefocusMap"):
        assert set(ARTIST_WORDS) <= set(classes[node].SEARCH_ALIASES), node
    # front ends that search display names only rank a name starting with the query first
    assert names["GenRefocusClassicalBokeh"].lower().startswith("bokeh")
    assert not any(n.lower().startswith("bokeh") for k, n in names.items() if k != "GenRefocusClassicalBokeh")
    assert "depth of field" in names["GenRefocusDefocusMap"].lower()
    assert "lens blur" in names["GenRefocusClassicalBokeh"].lower()
