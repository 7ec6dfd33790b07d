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
    from genrefocus_core.errors import MissingModelFileError
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
    from genrefocus_core.errors import InputError
    with pytest.raises(InputError, match="aspect"):
        node.convert(metric, "depth", "auto", "metric", 1.0, 20.0, 1.0, image=torch.rand(1, 32, 32, 3))


def test_load_depth_map_file(pack, tmp_path, monkeypatch):
    comfy_bridge = sub(pack, "comfy_bridge")
    monkeypatch.setattr(comfy_bridge, "input_directory", lambda: str(tmp_path))
    np.save(tmp_path / "d.npy", np.full((8, 10), 2000, dtype=np.uint16))
    cls = pack.NODE_CLASS_MAPPINGS["GenRefocusLoadDepthMap"]
    assert "d.npy" in cls.INPUT_TYPES()["required"]["depth_file"][0]
    depth, preview = cls().load("d.npy", "depth", "auto", "metric", 1.0, 20.0, 0.001)
    assert depth.disparity.shape == (1, 8, 10) and torch.allclose(depth.disparity, torch.tensor(0.5))
    from genrefocus_core.errors import InputError
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
    assert depth.metric and depth.disparity.shape == (2, 20, 28) and depth.focal_px.shape == (2,)
    assert preview.shape == (2, 20, 28, 3) and 0 <= preview.min() and preview.max() <= 1
    from genrefocus_core.errors import MissingModelFileError
    with pytest.raises(MissingModelFileError, match="depth_pro"):
        loader().load("depth_pro.pt", "auto")


# ---------------------------------------------------------------------------------------- defocus
def _depth(pack, disparity, metric=True):
    return sub(pack, "common").DepthMaps(disparity=disparity, metric=metric, source="test")


DEFAULTS = dict(focus_mode="point", focus_x=0.5, focus_y=0.5, focus_disparity=0.5, blur_mode="K", K=20.0,
                f_number=2.0, focal_length_mm=50.0, sensor_width_mm=36.0, focus_distance_m=2.0)


def test_defocus_map_point_mask_value(pack):
    node = _node(pack, "GenRefocusDefocusMap")
    disp = torch.linspace(0.1, 1.0, 40).view(1, 1, 40).expand(2, 30, 40).clone()
    out = node.build(_depth(pack, disp), **DEFAULTS)
    data, preview = out["result"]
    assert data.signed_coc.shape == (2, 30, 40) and preview.shape == (2, 30, 40, 3)
    fx = round(0.5 * 39)
    assert torch.allclose(data.focus_disparity, disp[:, 15, fx])
    assert torch.allclose(data.signed_coc, 20.0 * (disp - disp[:, 15, fx].view(2, 1, 1)))
    assert data.signed_coc[:, 15, fx].abs().max() == 0
    # the focus point is echoed for the picker, the preview is green at the focal plane
    assert out["ui"]["genrefocus_focus"] == [[0.5, 0.5]]
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
    from genrefocus_core.defocus import blur_level_from_lens
    from genrefocus_core.errors import InputError
    node = _node(pack, "GenRefocusDefocusMap")
    disp = torch.rand(1, 16, 24) + 0.1
    data = node.build(_depth(pack, disp), **{**DEFAULTS, "blur_mode": "lens"})["result"][0]
    assert data.K == pytest.approx(blur_level_from_lens(2.0, 50.0, 36.0, 2.0, 24))
    with pytest.raises(InputError, match="metric"):
        node.build(_depth(pack, disp, metric=False), **{**DEFAULTS, "blur_mode": "lens"})
    with pytest.raises(InputError, match="focus_mask"):
        node.build(_depth(pack, disp), **{**DEFAULTS, "focus_mode": "mask"})
    with pytest.raises(InputError, match="focus_x"):
        node.build(_depth(pack, disp), **{**DEFAULTS, "focus_x": 1.5})
    with pytest.raises(InputError, match="K"):
        node.build(_depth(pack, disp), **{**DEFAULTS, "K": -1.0})
    with pytest.raises(InputError, match="depth node"):
        node.build(torch.zeros(1, 4, 4), **DEFAULTS)
    zero = node.build(_depth(pack, disp), **{**DEFAULTS, "K": 0.0})["result"][0]
    assert zero.defocus_px.abs().max() == 0
