"""Contracts of the ComfyUI nodes, without ComfyUI: registration, INPUT_TYPES, tooltips, types,
shapes, batches and the error messages users see."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFY_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
COMFY_SOCKET_TYPES = {"IMAGE", "MASK", "CLIP", "LATENT", "MODEL", "VAE", "CONDITIONING"}


@pytest.fixture(scope="module")
def pack():
    """Import the pack the way ComfyUI does: the repo folder as a package under an odd module name."""
    name = "custom_nodes_x_ComfyUI-GenRefocus"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    yield mod
    for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[k]


def sub(pack, name):
    """A module of the pack as ComfyUI loaded it (the same objects its nodes use)."""
    return importlib.import_module(f"{pack.__name__}.nodes.{name}")


def _all_inputs(cls):
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}, cls
    for section in ("required", "optional"):
        for name, value in (spec.get(section) or {}).items():
            yield section, name, value


def test_pack_registers_nodes_and_web_directory(pack):
    assert pack.WEB_DIRECTORY == "./web/js"
    assert (ROOT / "web" / "js" / "focus_picker.js").is_file()
    classes, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    expected = {"GenRefocusDefocusMap", "GenRefocusDepthFromImage", "GenRefocusLoadDepthMap",
                "GenRefocusLoadDepthPro", "GenRefocusDepthEstimate"}
    assert expected <= set(classes)
    assert set(names) == set(classes)
    assert all(n.startswith("GenRefocus") for n in classes)


def test_every_node_contract(pack):
    for node_name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("GenRefocus"), node_name
        assert callable(getattr(cls, cls.FUNCTION)), node_name
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, node_name
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), (node_name, attr)
        assert isinstance(getattr(cls, "DESCRIPTION", ""), str) and cls.DESCRIPTION, node_name
        for section, name, value in _all_inputs(cls):
            assert isinstance(value, tuple) and len(value) == 2, (node_name, name, value)
            typ, opts = value
            assert isinstance(opts, dict), (node_name, name)
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, \
                f"{node_name}.{name} has no tooltip"
            if isinstance(typ, list):
                assert all(isinstance(x, str) for x in typ), (node_name, name)
                if "default" in opts and typ:  # (an empty model list keeps the usual file name as default)
                    assert opts["default"] in typ, (node_name, name)
            elif typ in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], (node_name, name)
                assert opts.get("step", 1) > 0
            else:
                assert typ in COMFY_WIDGET_TYPES | COMFY_SOCKET_TYPES or typ.startswith("GENREFOCUS_"), \
                    (node_name, name, typ)
        # the function accepts every input by name
        import inspect
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section, name, _ in _all_inputs(cls):
            assert name in params or any(p.kind == p.VAR_KEYWORD for p in params.values()), (node_name, name)
            if section == "optional" and name in params:
                assert params[name].default is not inspect.Parameter.empty, (node_name, name)
        json.dumps(cls.INPUT_TYPES())  # what /object_info sends must be JSON


def test_missing_dependency_disables_only_its_nodes(monkeypatch, caplog):
    import nodes as node_pkg
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.endswith(".depth_pro_nodes"):
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **k)

    monkeypatch.setattr(node_pkg.importlib, "import_module", fake)
    with caplog.at_level("WARNING"):
        classes, _, failed = node_pkg.collect_nodes()
    assert "depth_pro_nodes" in failed and "transformers" in failed["depth_pro_nodes"]
    assert "GenRefocusLoadDepthPro" not in classes and "GenRefocusDefocusMap" in classes
    assert "disabled" in caplog.text and "transformers" in caplog.text


# ---------------------------------------------------------------------------------------- bridge
def test_bridge_without_comfyui(tmp_path, monkeypatch):
    from genrefocus_core.basics.errors import MissingModelFileError
    from nodes import comfy_bridge as cb
    assert not cb.in_comfyui()
    monkeypatch.setenv("GENREFOCUS_MODELS_DIR", str(tmp_path))
    (tmp_path / "genrefocus" / "sub").mkdir(parents=True)
    (tmp_path / "genrefocus" / "bokehNet.safetensors").write_bytes(b"x")
    (tmp_path / "genrefocus" / "sub" / "deblurNet.safetensors").write_bytes(b"x")
    (tmp_path / "genrefocus" / "notes.txt").write_text("x")
    assert cb.list_models("genrefocus") == ["bokehNet.safetensors", "sub/deblurNet.safetensors"]
    assert cb.model_path("genrefocus", "bokehNet.safetensors").endswith("bokehNet.safetensors")
    with pytest.raises(MissingModelFileError) as e:
        cb.model_path("genrefocus", "deblurNet.safetensors")
    assert "deblurNet.safetensors" in str(e.value) and str(tmp_path / "genrefocus") in str(e.value)
    with pytest.raises(MissingModelFileError, match="model picker"):
        cb.model_path("vae", "")
    progress = cb.StepProgress(4)
    for i in range(1, 5):
        progress(i, 4, None)
    assert progress.calls == 4
    assert cb.save_preview_images(torch.zeros(1, 4, 4, 3)) == []
    assert str(cb.torch_device()) in ("cpu", "cuda")


def test_bridge_uses_comfyui_when_present(tmp_path, monkeypatch):
    """With ComfyUI's modules importable, the bridge registers folders, reports progress and raises
    ComfyUI's interrupt between steps (fake modules with ComfyUI's function names)."""
    import types
    from nodes import comfy_bridge as cb
    models = tmp_path / "models"
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.folder_names_and_paths = {"vae": ([str(models / "vae")], {".safetensors"})}
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0][:]
    fp.get_filename_list = lambda name: sorted(
        str(p.relative_to(d)) for d in map(Path, fp.folder_names_and_paths[name][0]) if d.is_dir()
        for p in d.rglob("*") if p.is_file())
    fp.get_full_path = lambda name, f: next((str(Path(d) / f) for d in fp.folder_names_and_paths[name][0]
                                             if (Path(d) / f).is_file()), None)
    events = []

    class Interrupt(Exception):
        pass

    mm = types.ModuleType("comfy.model_management")
    state = {"interrupt": False}
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.unload_all_models = lambda: events.append("unload_all")
    mm.free_memory = lambda n, d: events.append(("free", n))
    mm.soft_empty_cache = lambda: events.append("empty")

    def throw():
        if state["interrupt"]:
            raise Interrupt()
    mm.throw_exception_if_processing_interrupted = throw
    utils = types.ModuleType("comfy.utils")

    class Bar:
        def __init__(self, total):
            self.total = total
            events.append(("bar", total))

        def update_absolute(self, v, total=None, preview=None):
            events.append(("step", v, total))
    utils.ProgressBar = Bar
    comfy = types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    assert cb.in_comfyui()
    cb.register_model_folders()
    assert (models / "genrefocus").is_dir() and (models / "depth_pro").is_dir()
    assert fp.folder_names_and_paths["genrefocus"][0] == [str(models / "genrefocus")]
    assert ".safetensors" in fp.folder_names_and_paths["depth_pro"][1]
    cb.register_model_folders()  # idempotent
    assert fp.folder_names_and_paths["genrefocus"][0] == [str(models / "genrefocus")]
    (models / "genrefocus" / "bokehNet.safetensors").write_bytes(b"x")
    assert cb.list_models("genrefocus") == ["bokehNet.safetensors"]
    with pytest.raises(FileNotFoundError, match=str(models / "vae")):
        cb.model_path("vae", "ae.safetensors")
    cb.free_memory(None)
    cb.free_memory(1e9)
    assert events[:4] == ["unload_all", "empty", ("free", 1e9), "empty"]
    p = cb.StepProgress(3)
    p(1, 3, None)
    state["interrupt"] = True
    with pytest.raises(Interrupt):
        p(2, 3, None)
    assert ("bar", 3) in events and ("step", 1, 3) in events and ("step", 2, 3) in events


# ---------------------------------------------------------------------------------------- depth
def _node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def test_depth_from_image_and_batches(pack):
    node = _node(pack, "GenRefocusDepthFromImage")
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32, 1).expand(2, 24, 32, 3).clone()
    depth, preview = node.convert(ramp, "disparity", "auto", "relative", 1.0, 20.0, 1.0)
    assert depth.disparity.shape == (2, 24, 32) and preview.shape == (2, 24, 32, 3)
    assert not depth.metric
    d = depth.disparity[0, 0]
    assert torch.all(d[1:] >= d[:-1])  # bright = near = larger disparity
    assert d[-1] == pytest.approx(1.0, rel=1e-4) and d[0] == pytest.approx(1 / 20.0, rel=1e-4)
    # metric depth in metres, resized to the image and repeated to its batch of 3
    metric = torch.full((1, 12, 16, 3), 0.5)
    image = torch.rand(3, 24, 32, 3)
    depth, _ = node.convert(metric, "depth", "auto", "metric", 1.0, 20.0, 4.0, image=image)
    assert depth.metric and depth.disparity.shape == (3, 24, 32)
    assert torch.allclose(depth.disparity, torch.full_like(depth.disparity, 0.5))  # 0.5 * 4 m -> 0.5 1/m
    from genrefocus_core.basics.errors import InputError
    with pytest.raises(InputError, match="aspect"):
        node.convert(metric, "depth", "auto", "metric", 1.0, 20.0, 1.0, image=torch.rand(1, 32, 32, 3))
    # frames of a clip: one normalisation by default (a near object entering frame 1 leaves frame 0's
    # background where it was), per image on request
    clip = torch.linspace(0.2, 0.6, 32).view(1, 1, 32, 1).expand(2, 24, 32, 3).clone()
    clip[1, :8, :8] = 1.0
    one, preview = node.convert(clip, "disparity", "auto", "relative", 1.0, 20.0, 1.0)
    assert torch.allclose(one.disparity[0, 20], one.disparity[1, 20])
    assert torch.equal(preview[0, 20], preview[1, 20])  # the preview keeps one scale too
    each, _ = node.convert(clip, "disparity", "auto", "relative", 1.0, 20.0, 1.0, "per_image")
    assert not torch.allclose(each.disparity[0, 20], each.disparity[1, 20])


def test_load_depth_map_file(pack, tmp_path, monkeypatch):
    comfy_bridge = sub(pack, "comfy_bridge")
    monkeypatch.setattr(comfy_bridge, "input_directory", lambda: str(tmp_path))
    np.save(tmp_path / "d.npy", np.full((8, 10), 2000, dtype=np.uint16))
    cls = pack.NODE_CLASS_MAPPINGS["GenRefocusLoadDepthMap"]
    assert "d.npy" in cls.INPUT_TYPES()["required"]["depth_file"][0]
    depth, preview = cls().load("d.npy", "depth", "auto", "metric", 1.0, 20.0, 0.001)
    assert depth.disparity.shape == (1, 8, 10) and torch.allclose(depth.disparity, torch.tensor(0.5))
    from genrefocus_core.basics.errors import InputError
    with pytest.raises(InputError, match="outside"):
        cls().load("../x.npy", "depth", "auto", "metric", 1.0, 20.0, 1.0)
    assert cls.IS_CHANGED("d.npy") == (tmp_path / "d.npy").stat().st_mtime


def test_depth_pro_nodes_tiny(pack, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    from tiny_depth_pro import build_tiny_depth_pro
    folder = build_tiny_depth_pro(tmp_path / "depth_pro")
    monkeypatch.setenv("GENREFOCUS_MODELS_DIR", str(tmp_path))
    loader = pack.NODE_CLASS_MAPPINGS["GenRefocusLoadDepthPro"]
    choices = loader.INPUT_TYPES()["required"]["model_name"][0]
    assert "depth-pro-tiny/model.safetensors" in choices
    (model,) = loader().load("depth-pro-tiny/model.safetensors", "auto")
    assert loader().load("depth-pro-tiny/model.safetensors", "auto")[0] is model  # cached
    depth, preview = _node(pack, "GenRefocusDepthEstimate").estimate(model, torch.rand(2, 20, 28, 3))
    assert depth.metric and depth.disparity.shape == (2, 20, 28)
    assert preview.shape == (2, 20, 28, 3) and 0 <= preview.min() and preview.max() <= 1
    from genrefocus_core.basics.errors import MissingModelFileError
    with pytest.raises(MissingModelFileError, match="depth_pro"):
        loader().load("depth_pro.pt", "auto")


# ---------------------------------------------------------------------------------------- defocus
def _depth(pack, disparity, metric=True):
    return sub(pack, "common").DepthMaps(disparity=disparity, metric=metric)


DEFAULTS = dict(focus_mode="point", focus_x=0.5, focus_y=0.5, focus_disparity=0.5, blur_mode="K", K=20.0,
                f_number=2.0, focal_length_mm=50.0, sensor_width_mm=36.0, focus_distance_m=0.0)


def test_defocus_map_point_mask_value(pack):
    node = _node(pack, "GenRefocusDefocusMap")
    disp = torch.linspace(0.1, 1.0, 40).view(1, 1, 40).expand(2, 30, 40).clone()
    out = node.build(_depth(pack, disp), **DEFAULTS)
    data, preview, radius, in_focus = out["result"]
    assert data.signed_coc.shape == (2, 30, 40) and preview.shape == (2, 30, 40, 3)
    assert torch.equal(radius, (data.signed_coc.abs() / 100).clamp(0, 1))
    assert torch.equal(in_focus, (data.signed_coc.abs() < 0.5).float())
    fx = round(0.5 * 39)
    assert torch.allclose(data.focus_disparity, disp[:, 15, fx])
    assert torch.allclose(data.signed_coc, 20.0 * (disp - disp[:, 15, fx].view(2, 1, 1)))
    assert data.signed_coc[:, 15, fx].abs().max() == 0
    # the preview is green at the focal plane
    assert preview[0, 15, fx, 1] > 0.9
    left = node.build(_depth(pack, disp), **{**DEFAULTS, "focus_x": 0.0})["result"][0]
    assert torch.allclose(left.focus_disparity, torch.tensor([0.1, 0.1]))
    mask = torch.zeros(1, 15, 20)
    mask[:, :, -2:] = 1  # right edge, given at half resolution
    m = node.build(_depth(pack, disp), **{**DEFAULTS, "focus_mode": "mask"}, focus_mask=mask)["result"][0]
    assert m.focus_disparity.min() > 0.95
    v = node.build(_depth(pack, disp), **{**DEFAULTS, "focus_mode": "value", "focus_disparity": 0.25})["result"][0]
    assert torch.allclose(v.focus_disparity, torch.tensor([0.25, 0.25]))
    img = torch.rand(1, 30, 40, 3)
    over = node.build(_depth(pack, disp), **DEFAULTS, image=img)["result"][1]
    assert over.shape == (2, 30, 40, 3)


def test_defocus_map_lens_and_errors(pack):
    from genrefocus_core.basics.defocus import blur_level_from_lens
    from genrefocus_core.basics.errors import InputError
    node = _node(pack, "GenRefocusDefocusMap")
    disp = torch.rand(1, 16, 24) + 0.1
    # focus_mode 'distance': the focal plane is at that distance, the lens focused there
    data = node.build(_depth(pack, disp), **{**DEFAULTS, "focus_mode": "distance", "blur_mode": "lens",
                                             "focus_distance_m": 2.0})["result"][0]
    assert data.K.tolist() == pytest.approx([blur_level_from_lens(2.0, 50.0, 36.0, 2.0, 24)])
    assert data.focus_disparity.tolist() == pytest.approx([0.5])
    assert torch.allclose(data.signed_coc, data.K * (disp - 0.5))
    # 0 = infinity: disparity 0, K the thin-lens limit f^2 / 2N (as the CLI's --focus-depth inf)
    inf = node.build(_depth(pack, disp), **{**DEFAULTS, "focus_mode": "distance", "blur_mode": "lens"})["result"][0]
    assert inf.focus_disparity.tolist() == [0.0]
    assert inf.K.tolist() == pytest.approx([50.0 ** 2 / (2 * 2.0) * 24 / 36 / 1000], rel=1e-6)
    # other focus modes: the lens is focused on the chosen plane, per image of a batch
    two = torch.stack([torch.full((16, 24), 0.5), torch.full((16, 24), 0.25)])
    two[:, 0, 0] = 1.0
    data = node.build(_depth(pack, two), **{**DEFAULTS, "blur_mode": "lens"})["result"][0]
    k = [blur_level_from_lens(2.0, 50.0, 36.0, d, 24) for d in (2.0, 4.0)]
    assert data.K.tolist() == pytest.approx(k)
    assert data.signed_coc[0, 0, 0] == pytest.approx(k[0] * 0.5) and data.signed_coc[1, 0, 0] == pytest.approx(k[1] * 0.75)
    with pytest.raises(InputError, match="metric"):
        node.build(_depth(pack, disp, metric=False), **{**DEFAULTS, "blur_mode": "lens"})
    # a lens focused both by a point and at a distance: said, not silently resolved one way
    with pytest.raises(InputError, match="focus_distance_m"):
        node.build(_depth(pack, disp), **{**DEFAULTS, "blur_mode": "lens", "focus_distance_m": 2.0})
    with pytest.raises(InputError, match="focus_mask"):
        node.build(_depth(pack, disp), **{**DEFAULTS, "focus_mode": "mask"})
    with pytest.raises(InputError, match="focus_x"):
        node.build(_depth(pack, disp), **{**DEFAULTS, "focus_x": 1.5})
    with pytest.raises(InputError, match="K"):
        node.build(_depth(pack, disp), **{**DEFAULTS, "K": -1.0})
    with pytest.raises(InputError, match="depth node"):
        node.build(torch.zeros(1, 4, 4), **DEFAULTS)
    zero = node.build(_depth(pack, disp), **{**DEFAULTS, "K": 0.0})["result"][0]
    assert zero.signed_coc.abs().max() == 0


# ---------------------------------------------------------------------------------------- workflows
WORKFLOW_DIR = ROOT / "workflows"
EXPECTED_WORKFLOWS = {"Bokeh Lens Blur (classical, no weights).json",
                      "Focus Pull over a Clip (classical, no weights).json",
                      "Rack Focus from a Still (classical, no weights).json",
                      "Refocus a Photo (DeblurNet, BokehNet).json",
                      "Refocus a Photo in Tiles (DeblurNet, BokehNet).json",
                      "Sharpen a Blurry Photo (DeblurNet).json",
                      "Text to Image, then Refocus (BokehNet).json"}


def test_workflows_match_the_nodes(pack):
    """Every shipped workflow: UI format, our nodes exist, widget values fit INPUT_TYPES (count, combo
    choices, numeric ranges), links connect matching types. Catches drift between nodes and workflows."""
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    from ui_to_api import widget_inputs
    assert {p.name for p in WORKFLOW_DIR.glob("*.json")} == EXPECTED_WORKFLOWS
    classes = pack.NODE_CLASS_MAPPINGS
    for path in WORKFLOW_DIR.glob("*.json"):
        ui = json.loads(path.read_text())
        assert {"nodes", "links", "version"} <= set(ui), path.name
        nodes = {n["id"]: n for n in ui["nodes"]}
        for link in ui["links"]:
            _, src, src_slot, dst, dst_slot, typ = link
            assert nodes[src]["outputs"][src_slot]["type"] == typ, (path.name, link)
            assert nodes[dst]["inputs"][dst_slot]["type"] == typ, (path.name, link)
            assert nodes[dst]["inputs"][dst_slot]["link"] == link[0]
        ours = [n for n in ui["nodes"] if n["type"].startswith("GenRefocus")]
        assert ours, path.name
        for n in ours:
            cls = classes[n["type"]]
            info = {"input": cls.INPUT_TYPES()}
            expected = widget_inputs(info)
            values = n["widgets_values"]
            # a workflow saved before optional widgets were appended has fewer values: those widgets
            # take their defaults (the front end and the API converter both do), so it loads unchanged
            optional = set(cls.INPUT_TYPES().get("optional") or {})
            stored = [e for e in expected if sum(1 + x for _, _, x in expected[:expected.index(e) + 1]) <= len(values)]
            assert len(values) == len(stored) + sum(e for _, _, e in stored), (path.name, n["type"])
            assert {name for name, _, _ in expected[len(stored):]} <= optional, (path.name, n["type"])
            i = 0
            for name, spec, extra in stored:
                v = values[i]
                if isinstance(spec[0], list) and spec[0] and not name.endswith(("_model", "_name", "_lora",
                                                                                  "prompt_embeddings", "depth_file")):
                    assert v in spec[0], (path.name, n["type"], name, v)
                elif spec[0] in ("INT", "FLOAT"):
                    assert spec[1]["min"] <= v <= spec[1]["max"], (path.name, n["type"], name, v)
                i += 1 + extra
            required = [k for k, s in cls.INPUT_TYPES()["required"].items() if not _widget(s)]
            linked = {inp["name"] for inp in n["inputs"] if inp.get("link") is not None}
            assert set(required) <= linked, (path.name, n["type"], set(required) - linked)


def _widget(spec):
    return isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")


def test_ui_to_api_converter():
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    from ui_to_api import convert
    info = {"A": {"input": {"required": {"x": ["INT", {"default": 1, "min": 0, "max": 9, "control_after_generate": True}],
                                         "img": ["IMAGE", {}], "mode": [["a", "b"], {}]},
                            "optional": {"f": ["FLOAT", {"default": 0.5, "min": 0, "max": 1}]}}},
            "B": {"input": {"required": {"image": [["p.png"], {"image_upload": True}]}}}}
    ui = {"nodes": [
        {"id": 1, "type": "B", "mode": 0, "inputs": [], "outputs": [{"type": "IMAGE"}], "widgets_values": ["p.png", "image"]},
        {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}], "outputs": [{"type": "*"}]},
        {"id": 3, "type": "A", "mode": 0, "inputs": [{"name": "img", "type": "IMAGE", "link": 2}],
         "widgets_values": [7, "fixed", "b", 0.25]},
        {"id": 4, "type": "MarkdownNote", "widgets_values": ["hi"]},
        {"id": 5, "type": "A", "mode": 2, "inputs": [], "widgets_values": [1, "fixed", "a", 0.5]},
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]}
    api = convert(ui, info)
    assert api == {"1": {"class_type": "B", "inputs": {"image": "p.png"}, "_meta": {"title": "B"}},
                   "3": {"class_type": "A", "inputs": {"x": 7, "mode": "b", "f": 0.25, "img": ["1", 0]},
                         "_meta": {"title": "A"}}}


def test_pyproject_matches_requirements():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(project["project"]["dependencies"]) == sorted(r for r in reqs if r)
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "web" in comfy["includes"]


# ---------------------------------------------------------------------------------------- scene, aperture, classical
def test_scene_aperture_classical_nodes(pack):
    from genrefocus_core.basics.errors import InputError
    image, depth, preview = _node(pack, "GenRefocusScene").make(96, 64, 1)
    assert image.shape == (1, 64, 96, 3) and depth.disparity.shape == (1, 64, 96) and depth.metric
    assert preview.shape == (1, 64, 96, 3)
    shape = _node(pack, "GenRefocusApertureShape")
    args = dict(blades=6, rotation_deg=0.0, curvature=0.0, star_points=5, star_inner_ratio=0.5, cat_eye_strength=0.5,
                cat_eye_direction_deg=0.0, preview_size=64)
    areas = {}
    for s in sub(pack, "aperture_nodes").SHAPE_CHOICES[:-1]:
        ap, prev = shape.make(s, **args)
        assert prev.shape == (1, 64, 64, 3)
        areas[s] = float(prev.mean())
    assert areas["circle"] > areas["polygon"] > areas["triangle"] > 0.05
    mask = torch.zeros(1, 32, 32)
    mask[:, 4:28, 12:20] = 1.0  # a tall bar
    ap, prev = shape.make("custom", **args, custom_mask=mask)
    opening = prev[0, :, :, 0] > 0.5
    height, width = int(opening.any(1).sum()), int(opening.any(0).sum())
    assert height > 2 * width  # the tall bar stays tall
    ap_img, _ = shape.make("custom", **args, custom_image=mask[..., None].expand(1, 32, 32, 3))
    with pytest.raises(InputError, match="custom"):
        shape.make("custom", **args)
    with pytest.raises(InputError, match="empty"):
        shape.make("custom", **args, custom_mask=torch.zeros(1, 8, 8))
    # classical bokeh: batch of focus settings over one image; K = 0 is the identity
    defocus_node = _node(pack, "GenRefocusDefocusMap")
    both = sub(pack, "common").DepthMaps(disparity=depth.disparity.expand(2, -1, -1).clone(), metric=True)
    data = defocus_node.build(both, **{**DEFAULTS, "focus_mode": "value", "focus_disparity": 0.3})["result"][0]
    bokeh = _node(pack, "GenRefocusClassicalBokeh")
    (out,) = bokeh.render(image, data, 0.0, 0.9, "srgb", aperture=ap)
    assert out.shape == (2, 64, 96, 3) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert (out - image).abs().mean() > 0.005
    zero = defocus_node.build(depth, **{**DEFAULTS, "K": 0.0})["result"][0]
    (same,) = bokeh.render(image, zero, 0.0, 0.9, "srgb")
    assert torch.equal(same, image)
    with pytest.raises(InputError, match="Defocus Map"):
        bokeh.render(image, torch.zeros(1, 64, 96), 0.0, 0.9, "srgb")
    with pytest.raises(InputError, match="Batch"):
        bokeh.render(torch.rand(3, 64, 96, 3), data, 0.0, 0.9, "srgb")


def test_scene_clip_focus_pull_and_classical_bokeh(pack):
    """A rack focus through the nodes: a still repeated into frames, and a clip with depth per frame."""
    from genrefocus_core.basics.errors import InputError
    from genrefocus_core.basics.scene import PILLAR_M, SIGN_M, make_scene, make_scene_clip
    pull = _node(pack, "GenRefocusFocusPull")
    bokeh = _node(pack, "GenRefocusClassicalBokeh")
    image, depth, _ = _node(pack, "GenRefocusScene").make(96, 64, 0)
    depth_m = make_scene(64, 96, seed=0)[1][0]
    # a still: frames from the repeated image's batch (frames = 0), or set directly
    keys = f"0: distance {PILLAR_M}\nlast: depth 1 K=30 linear"
    out = pull.pull(depth, keys, 0, 20.0, "ease-in-out", image=image.expand(5, -1, -1, -1))
    data, preview, radius, in_focus = out["result"]
    assert data.signed_coc.shape == (5, 64, 96) and preview.shape == (5, 64, 96, 3)
    assert radius.shape == in_focus.shape == (5, 64, 96)
    assert data.signed_coc[0][depth_m == PILLAR_M].abs().max() == 0
    assert (in_focus[0][depth_m == PILLAR_M] == 1).all() and (in_focus[4][depth_m == 20.0] == 1).all()
    assert data.signed_coc[4][depth_m == 20.0].abs().max() == 0
    assert data.K.tolist() == pytest.approx([20.0, 22.5, 25.0, 27.5, 30.0])
    direct = pull.pull(depth, keys, 5, 20.0, "ease-in-out")["result"][0]
    assert torch.equal(direct.signed_coc, data.signed_coc)
    # Defocus Map's lens controls on every frame: a real lens (its blur follows the focus), band, near/far
    lensed = pull.pull(depth, f"0: distance {PILLAR_M}\nlast: depth 1", 5, 20.0, "linear", blur_mode="lens",
                       f_number=1.8, focal_length_mm=85.0, in_focus_range=1.0, near_blur=0.5)["result"][0]
    assert lensed.signed_coc[0][depth_m == PILLAR_M].abs().max() == 0 and float(lensed.K[0]) > float(lensed.K[4])
    with pytest.raises(InputError, match="lens"):
        pull.pull(depth, "0: depth 1 K=3", 5, 20.0, "linear", blur_mode="lens")
    (frames,) = bokeh.render(image, data, 0.0, 0.9, "srgb")  # the still serves every frame
    assert frames.shape == (5, 64, 96, 3)
    pillar = depth_m == PILLAR_M
    # sharp where the blur radius is zero (only light from blurred neighbours in front reaches it)
    sharp, blurred = ((frames[f][pillar] - image[0][pillar]).abs().mean() for f in (0, 4))
    assert sharp < 0.1 * blurred and blurred > 0.01
    # a clip: the sign enters from the left, the pull racks from the far wall to it
    clip, clip_depth, _ = _node(pack, "GenRefocusSceneClip").make(96, 64, 0, 6)
    clip_m = make_scene_clip(64, 96, frames=6, seed=0)[1]
    assert clip.shape == (6, 64, 96, 3) and clip_depth.disparity.shape == (6, 64, 96) and clip_depth.metric
    assert torch.allclose(clip_depth.disparity, 1.0 / clip_m)
    data = pull.pull(clip_depth, f"0: depth 1\n5: distance {SIGN_M} hold", 0, 20.0, "ease-in-out", image=clip)["result"][0]
    assert data.signed_coc.shape == (6, 64, 96)
    assert data.signed_coc[5][clip_m[5] == SIGN_M].abs().max() == 0
    assert torch.equal(data.signed_coc[:5], pull.pull(clip_depth, "0: depth 1", 0, 20.0, "linear")["result"][0].signed_coc[:5])
    with pytest.raises(InputError, match="6 frames but the pull asks for 4"):
        pull.pull(clip_depth, "0: depth 1", 4, 20.0, "linear")
    with pytest.raises(InputError, match="image batch of 3"):
        pull.pull(depth, "0: depth 1", 5, 20.0, "linear", image=image.expand(3, -1, -1, -1))
    with pytest.raises(InputError, match="line 1"):
        pull.pull(depth, "zero: depth 1", 5, 20.0, "linear")
    with pytest.raises(InputError, match="depth node"):
        pull.pull(torch.zeros(1, 8, 8), "0: depth 1", 5, 20.0, "linear")


# ---------------------------------------------------------------------------------------- generative (tiny)
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("models")
    for rel, src in {"genrefocus/deblurNet.safetensors": tiny_dir / "deblurNet.safetensors",
                     "genrefocus/bokehNet.safetensors": tiny_dir / "bokehNet.safetensors",
                     "genrefocus/prompt_embeds.safetensors": tiny_dir / "prompt_embeds.safetensors"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(src)
    return root


class FakeComfyModel:
    """ComfyUI's MODEL as the nodes use it (a ModelPatcher's model.diffusion_model, latent format, dtypes,
    devices, clone) around the tiny FLUX in BFL's layout (tests/bfl_flux.py)."""

    def __init__(self, diffusion_model):
        from types import SimpleNamespace
        self.model = SimpleNamespace(diffusion_model=diffusion_model, manual_cast_dtype=None,
                                     get_dtype=lambda: torch.float32,
                                     latent_format=SimpleNamespace(shift_factor=0.1159, scale_factor=0.3611))
        self.load_device = self.offload_device = torch.device("cpu")

    def clone(self):
        import copy
        return copy.copy(self)


class FakeComfyVae:
    """ComfyUI's VAE as the nodes use it (first_stage_model's encoder, vae_dtype, decode to [B,H,W,3])
    around the tiny diffusers autoencoder."""

    def __init__(self, vae):
        self.first_stage_model, self.vae_dtype, self.latent_channels = vae, torch.float32, 16

    def decode(self, z):
        image = self.first_stage_model.decode(z, return_dict=False)[0]
        return ((image + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)


@pytest.fixture(scope="module")
def comfy_models(tiny_dir):
    from bfl_flux import build_tiny_bfl
    from tiny_flux import build_tiny
    return FakeComfyModel(build_tiny_bfl(tiny_dir)), FakeComfyVae(build_tiny(tiny_dir)[1])


LOAD_ARGS = dict(deblur_lora="deblurNet.safetensors", bokeh_lora="bokehNet.safetensors", pre_deblur_lora="none",
                 aperture_lora="none", prompt_embeddings="prompt_embeds.safetensors")


def test_generative_nodes_tiny(pack, tiny_models, comfy_models, monkeypatch, tmp_path):
    from genrefocus_core.basics.errors import InputError
    monkeypatch.setenv("GENREFOCUS_MODELS_DIR", str(tiny_models))
    monkeypatch.setenv("GENREFOCUS_CACHE_DIR", str(tmp_path / "empty-cache"))
    flux, vae = comfy_models
    gen = sub(pack, "generative_nodes")
    loader = gen.GenRefocusLoadModel
    req = loader.INPUT_TYPES()["required"]
    assert req["model"][0] == "MODEL"
    assert req["deblur_lora"][0][0] == "none" and "bokehNet.safetensors" in req["bokeh_lora"][0]
    (model,) = loader().load(flux, **LOAD_ARGS)
    assert set(model.adapters) == {"deblurring", "bokeh"} and model.dtype == torch.float32
    (again,) = loader().load(flux, **LOAD_ARGS)
    assert again.slices is model.slices  # the adapters stay with the MODEL between runs
    (fewer,) = loader().load(flux, **{**LOAD_ARGS, "deblur_lora": "none"})
    assert fewer.adapters == ["bokeh"]  # adapters swapped, FLUX untouched
    with pytest.raises(InputError, match="deblurNet.safetensors as 'deblur_lora'"):
        gen.GenRefocusDeblurNet().deblur(fewer, vae, torch.rand(1, 16, 16, 3), "auto")
    with pytest.raises(InputError, match="aperture_lora"):
        gen.GenRefocusBokehNet().refocus(fewer, vae, torch.rand(1, 16, 16, 3), None, aperture=object())
    (model,) = loader().load(flux, **LOAD_ARGS)
    (sampler,) = gen.GenRefocusTiledSampler().make(2, 7, "off", 512, 64, 1, 0.0)
    assert sampler.steps == 2 and sampler.seed == 7 and sampler.tiled is False and sampler.guidance is None
    (tiles,) = gen.GenRefocusTiledSampler().make(2, 7, "on", 64, 16, 2, 2.5)
    assert (tiles.tile_size, tiles.tile_overlap, tiles.tile_batch, tiles.guidance) == (4, 1, 2, 2.5)
    with pytest.raises(InputError, match="multiple of 16"):
        gen.GenRefocusTiledSampler().make(2, 7, "on", 72, 16, 1, 0.0)
    calls = []
    progress = sub(pack, "comfy_bridge").StepProgress

    class Recorder(progress):
        def __call__(self, step, total, latents=None):
            calls.append((step, total))
            super().__call__(step, total, latents)
    monkeypatch.setattr(sub(pack, "comfy_bridge"), "StepProgress", Recorder)
    image = torch.rand(2, 72, 88, 3)
    (aif,) = gen.GenRefocusDeblurNet().deblur(model, vae, image, "auto", sampler=sampler)
    assert aif.shape == (2, 72, 88, 3) and torch.isfinite(aif).all()
    assert calls[:2] == [(1, 2), (2, 2)]
    small = image[:1, :32, :32]
    first = gen.GenRefocusDeblurNet().deblur(model, vae, small, "auto", sampler=sampler)[0]
    assert torch.equal(first, gen.GenRefocusDeblurNet().deblur(model, vae, small, "auto", sampler=sampler)[0])
    depth = sub(pack, "common").DepthMaps(disparity=torch.linspace(0.1, 1, 88).expand(1, 72, 88).clone(),
                                          metric=True)
    defocus = _node(pack, "GenRefocusDefocusMap").build(depth, **DEFAULTS)["result"][0]
    (out,) = gen.GenRefocusBokehNet().refocus(model, vae, aif, defocus, sampler=tiles)
    assert out.shape == (2, 72, 88, 3) and (out - aif).abs().mean() > 1e-3
    zero = _node(pack, "GenRefocusDefocusMap").build(depth, **{**DEFAULTS, "K": 0.0})["result"][0]
    (same,) = gen.GenRefocusBokehNet().refocus(model, vae, aif, zero)
    assert torch.equal(same, aif)
    with pytest.raises(InputError, match="Load GenRefocus"):
        gen.GenRefocusDeblurNet().deblur(object(), vae, image, "auto")
    with pytest.raises(InputError, match="FLUX's autoencoder"):
        gen.GenRefocusDeblurNet().deblur(model, object(), image, "auto")
    with pytest.raises(InputError, match="MODEL"):
        loader().load(object(), **LOAD_ARGS)
    with pytest.raises(InputError, match="prompt"):
        loader().load(flux, **{**LOAD_ARGS, "prompt_embeddings": "none"})
    with pytest.raises(InputError, match="at least one LoRA"):
        loader().load(flux, **{**LOAD_ARGS, "deblur_lora": "none", "bokeh_lora": "none"})


def test_loader_adapter_cache_after_a_failed_switch_and_on_a_hit(pack, tiny_models, comfy_models, monkeypatch,
                                                                 tmp_path):
    """Review bugs: switching a LoRA to a corrupt file and back left BokehNet without its adapter;
    a cache hit skipped the aperture-needs-bokeh rule."""
    from safetensors.torch import load_file, save_file

    from genrefocus_core.basics.errors import InputError, ModelFileError
    root = tmp_path / "models"
    for rel in ("genrefocus/bokehNet.safetensors", "genrefocus/deblurNet.safetensors",
                "genrefocus/prompt_embeds.safetensors"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(tiny_models / rel)
    (root / "genrefocus/corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bokeh_sd = load_file(str(tiny_models / "genrefocus/bokehNet.safetensors"))
    save_file({k: v * 0.5 for k, v in bokeh_sd.items()}, str(root / "genrefocus/aperture.safetensors"))
    monkeypatch.setenv("GENREFOCUS_MODELS_DIR", str(root))
    monkeypatch.setenv("GENREFOCUS_CACHE_DIR", str(tmp_path / "empty-cache"))
    flux, vae = comfy_models
    gen = sub(pack, "generative_nodes")
    loader = gen.GenRefocusLoadModel
    (model,) = loader().load(flux, **LOAD_ARGS)
    with pytest.raises(ModelFileError, match="corrupt.safetensors"):
        loader().load(flux, **{**LOAD_ARGS, "bokeh_lora": "corrupt.safetensors"})
    (back,) = loader().load(flux, **LOAD_ARGS)
    assert set(back.adapters) == {"deblurring", "bokeh"}
    depth = sub(pack, "common").DepthMaps(disparity=torch.linspace(0.1, 1, 16).expand(1, 16, 16).clone(),
                                          metric=True)
    defocus = _node(pack, "GenRefocusDefocusMap").build(depth, **DEFAULTS)["result"][0]
    (sampler,) = gen.GenRefocusTiledSampler().make(1, 7, "off", 512, 64, 1, 0.0)
    (out,) = gen.GenRefocusBokehNet().refocus(back, vae, torch.rand(1, 16, 16, 3), defocus, sampler=sampler)
    assert out.shape == (1, 16, 16, 3)
    with pytest.raises(InputError, match="bokeh_lora"):
        loader().load(flux, **{**LOAD_ARGS, "bokeh_lora": "none", "aperture_lora": "aperture.safetensors"})
    (both,) = loader().load(flux, **{**LOAD_ARGS, "aperture_lora": "aperture.safetensors"})
    assert set(both.adapters) == {"deblurring", "bokeh", "aperture"}


class FakeComfyClip:
    """ComfyUI's CLIP interface as the loader node uses it (tokenize / encode_from_tokens)."""

    def __init__(self, honour_min_length=True, flux=True):
        self.honour, self.flux, self.options = honour_min_length, flux, None

    def tokenize(self, text, return_word_ids=False, **kwargs):
        self.options = kwargs.get("tokenizer_options", {})
        n = self.options.get("t5xxl_min_length", 256) if self.honour else 256
        return {"l": [[(1, 1.0)] * 77], "t5xxl": [[(0, 1.0)] * n]} if self.flux else {"l": [[(1, 1.0)] * 77]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        n = len(tokens["t5xxl"][0]) if "t5xxl" in tokens else 77
        return torch.full((1, n, 32), 0.5), torch.ones(1, 32)  # the tiny FLUX's text sizes


def test_encode_with_comfy_clip(pack):
    from genrefocus_core.basics.errors import InputError
    gen = sub(pack, "generative_nodes")
    clip = FakeComfyClip()
    emb = gen.encode_with_comfy_clip(clip, "a sharp photo with everything in focus")
    assert clip.options == {"t5xxl_min_length": 512}
    assert emb.prompt_embeds.shape == (1, 512, 32) and emb.pooled.shape == (1, 32)
    assert emb.text_ids.shape == (512, 3) and not emb.text_ids.any()
    with pytest.raises(InputError, match="t5xxl_min_length"):
        gen.encode_with_comfy_clip(FakeComfyClip(honour_min_length=False), "x")
    with pytest.raises(InputError, match="DualCLIPLoader"):
        gen.encode_with_comfy_clip(FakeComfyClip(flux=False), "x")


def test_loader_with_clip_then_from_the_prompt_cache(pack, tiny_models, comfy_models, tmp_path, monkeypatch):
    """Encode with the connected CLIP once; the next load without CLIP and without a file uses the cache."""
    from genrefocus_core.basics.errors import InputError
    monkeypatch.setenv("GENREFOCUS_MODELS_DIR", str(tiny_models))
    monkeypatch.setenv("GENREFOCUS_CACHE_DIR", str(tmp_path / "cache"))
    gen = sub(pack, "generative_nodes")
    no_file = {**LOAD_ARGS, "prompt_embeddings": "none"}
    with pytest.raises(InputError, match="DualCLIPLoader"):
        gen.GenRefocusLoadModel().load(comfy_models[0], **no_file)
    clip = FakeComfyClip()
    (model,) = gen.GenRefocusLoadModel().load(comfy_models[0], **no_file, clip=clip)
    assert clip.options == {"t5xxl_min_length": 512}
    encoded = model.embeddings
    assert set(encoded) == {"deblur", "bokeh"} and encoded["bokeh"].prompt_embeds.shape == (1, 512, 32)
    (again,) = gen.GenRefocusLoadModel().load(comfy_models[0], **no_file)
    for stage in ("deblur", "bokeh"):
        assert torch.equal(again.embeddings[stage].prompt_embeds, encoded[stage].prompt_embeds)


def test_node_and_cli_agree_on_lens_controls(pack, tmp_path):
    """The same photo, depth and lens settings through Defocus Map + Classical Bokeh and through the
    `render` command give the same image (both call the core's focus and lens rules), also when focused
    at infinity (node: focus_distance_m 0, CLI: --focus-distance inf), with a tilted focal plane and
    with the shared highlight default. Compared after the same 8-bit rounding: identical operations, so identical bytes."""
    from PIL import Image

    from genrefocus_core.basics.images import load_image, save_image
    from genrefocus_core.basics.scene import make_scene
    from genrefocus_core.cli import render as cli_render
    from genrefocus_core.depth.sources import disparity_from_external
    image, depth = make_scene(48, 64, seed=2)
    save_image(image, tmp_path / "in.png")
    np.save(tmp_path / "depth.npy", depth[0].numpy())
    photo = load_image(tmp_path / "in.png")
    maps = sub(pack, "common").DepthMaps(disparity=disparity_from_external(depth, kind="depth", scale="metric"),
                                         metric=True)
    spec = _node(pack, "GenRefocusClassicalBokeh").INPUT_TYPES()["required"]
    defaults = cli_render.build_parser().parse_args(["--image", "a", "--out", "b", "--depth", "c"])
    assert spec["highlight_boost"][1]["default"] == defaults.highlight_boost > 0  # one shared default
    assert spec["highlight_threshold"][1]["default"] == defaults.highlight_threshold
    lens = {"blur_mode": "lens", "f_number": 1.4, "focal_length_mm": 200.0}
    settings = [  # (CLI focus options, the node's focus widgets)
        (["--focus-distance", "6"], {"focus_mode": "distance", "focus_distance_m": 6.0, **lens}),
        (["--focus-distance", "inf"], {"focus_mode": "distance", "focus_distance_m": 0.0, **lens}),
        # tilt-shift about a focus point (a thin sharp band turned by 20 degrees)
        (["--focus-norm", "0.25,0.75", "--tilt", "-0.8", "--tilt-angle", "20", "--K", "6"],
         {"focus_mode": "point", "focus_x": 0.25, "focus_y": 0.75, "K": 6.0, "tilt": -0.8, "tilt_angle": 20.0}),
    ]
    for i, (cli_focus, node_focus) in enumerate(settings):
        out = tmp_path / f"cli_{i}.png"
        cli_lens = ["--f-number", "1.4", "--focal-length", "200"] if "--K" not in cli_focus else []
        assert cli_render.main(["render", "--image", str(tmp_path / "in.png"), "--depth", str(tmp_path / "depth.npy"),
                                *cli_focus, *cli_lens, "--in-focus-m", "1", "--near-blur", "0.5", "--far-blur", "1.5",
                                "--aperture", "annular", "--out", str(out)]) == 0
        data = _node(pack, "GenRefocusDefocusMap").build(maps, **{**DEFAULTS, **node_focus, "in_focus_range": 1.0,
                                                                  "near_blur": 0.5, "far_blur": 1.5})["result"][0]
        ap, _ = _node(pack, "GenRefocusApertureShape").make(
            "annular", blades=6, rotation_deg=0.0, curvature=0.0, star_points=5, star_inner_ratio=0.5,
            cat_eye_strength=0.5, cat_eye_direction_deg=0.0, preview_size=16)
        (node_out,) = _node(pack, "GenRefocusClassicalBokeh").render(
            photo, data, spec["highlight_boost"][1]["default"], spec["highlight_threshold"][1]["default"], "srgb",
            aperture=ap)
        save_image(node_out, tmp_path / "node.png")
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "node.png")))
        assert float(data.signed_coc.abs().max()) > 2  # something was blurred
