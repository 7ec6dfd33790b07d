"""Success reported, image wrong: NaN and infinity slip through range checks (NaN compares false with
everything, so it also passes ComfyUI's min/max validation). Every number input of every node, of the
CLI and of the core's public functions is refused with a message naming the input."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from fixture_paths import ROOT
from hostile import forbid, photo_and_depth, run_cli, snapshot
from genrefocus_core.basics import apertures, defocus
from genrefocus_core.basics.errors import InputError
from genrefocus_core.classical.renderer import render_bokeh

BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(scope="module")
def registered_nodes():
    """Every node class as ComfyUI gets it (the pack imported like a custom node folder)."""
    name = "custom_nodes_bad_numbers"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    yield mod.NODE_CLASS_MAPPINGS
    for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[k]


def _number_inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, declared in (spec.get(section) or {}).items():
            if declared[0] in ("INT", "FLOAT"):
                yield name, declared[0], declared[1] if len(declared) > 1 else {}


def _call_with(cls, name, value):
    """Call the node's function with its defaults (a placeholder for sockets) and `name` = value."""
    spec = cls.INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for n, declared in (spec.get(section) or {}).items():
            kind = declared[0]
            opts = declared[1] if len(declared) > 1 and isinstance(declared[1], dict) else {}
            if isinstance(kind, list):
                kwargs[n] = opts.get("default", kind[0] if kind else "")
            elif kind in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                kwargs[n] = opts.get("default", 0)
            elif section == "required":
                kwargs[n] = object()  # a socket: never reached, the numbers are checked first
    kwargs[name] = value
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def test_every_number_input_of_every_node_refuses_nan_and_infinity(registered_nodes):
    checked = 0
    for node, cls in registered_nodes.items():
        for name, kind, opts in _number_inputs(cls):
            for bad in BAD:
                with pytest.raises(InputError, match=f"'{name}' must be a finite number") as e:
                    _call_with(cls, name, bad)
                assert str(bad) in str(e.value), (node, name)
                checked += 1
    assert checked >= 3 * 30  # every FLOAT and INT input of the 12+ nodes


def test_node_numbers_outside_their_declared_range_or_not_whole_are_refused(registered_nodes):
    """What ComfyUI's validation would refuse is refused also when a node is called another way
    (API prompts with odd JSON, other front ends): below min, above max, 2.5 for an INT."""
    for node, cls in registered_nodes.items():
        for name, kind, opts in _number_inputs(cls):
            if "min" in opts:
                with pytest.raises(InputError, match=f"'{name}' = .* is outside its range"):
                    _call_with(cls, name, opts["min"] - 1)
            if "max" in opts and opts["max"] < 2**62:
                with pytest.raises(InputError, match=f"'{name}' = .* is outside its range"):
                    _call_with(cls, name, opts["max"] + 1)
            if kind == "INT":
                with pytest.raises(InputError, match=f"'{name}' must be a whole number"):
                    _call_with(cls, name, opts.get("default", 0) + 0.5)


# ---------------------------------------------------------------------------------------------- core

@pytest.mark.parametrize("bad", BAD)
def test_core_refuses_non_finite_numbers(bad):
    disp = torch.rand(1, 8, 10) + 0.1
    img = torch.rand(1, 8, 10, 3)
    cases = {
        "Focus point": lambda: defocus.focus_disparity(disp, point=(bad, 2)),
        "Focus point ": lambda: defocus.focus_disparity(disp, point=(0.5, bad), normalized=True),
        "Focus disparity": lambda: defocus.focus_disparity(disp, value=bad),
        "Blur level K": lambda: defocus.defocus_map(disp, 0.5, bad),
        "f-number": lambda: defocus.blur_level_from_lens(bad, 50.0, 36.0, 2.0, 100),
        "rotation": lambda: apertures.polygon(6, rotation_deg=bad),
        "rotation  ": lambda: apertures.star(5, 0.5, rotation_deg=bad),
        "rotation   ": lambda: apertures.heart(rotation_deg=bad),
        "Cat-eye direction": lambda: apertures.cat_eye(0.5, direction_deg=bad),
        "curvature": lambda: apertures.polygon(6, curvature=bad),
        "threshold": lambda: apertures.from_image(torch.ones(9, 9), threshold=bad),
        "highlight_boost": lambda: render_bokeh(img, disp, 0.5, 5.0, highlight_boost=bad),
        "highlight_threshold": lambda: render_bokeh(img, disp, 0.5, 5.0, highlight_threshold=bad),
        "max_radius": lambda: render_bokeh(img, disp, 0.5, 5.0, max_radius=bad),
        "vignetting": lambda: render_bokeh(img, disp, 0.5, 5.0, vignetting=bad),
        "Focus disparity ": lambda: render_bokeh(img, disp, bad, 5.0),
    }
    if bad != float("inf"):  # +inf is a lens focused at infinity
        cases["focus distance"] = lambda: defocus.blur_level_from_lens(2.0, 50.0, 36.0, bad, 100)
    for what, call in cases.items():
        with pytest.raises(InputError) as e:
            call()
        message = str(e.value).lower()
        assert what.strip().lower().split()[-1] in message and ("finite" in message or "must" in message), (what, message)


def test_sampler_and_depth_options_refuse_non_finite_numbers():
    from genrefocus_core.depth.sources import disparity_from_external
    from genrefocus_core.generative.sampling import SamplerSettings

    for bad in BAD:
        with pytest.raises(InputError, match="guidance"):
            SamplerSettings(guidance=bad).validated()
        for option in ("near_m", "far_m", "unit"):
            scale = "metric" if option == "unit" else "relative"
            with pytest.raises(InputError, match=option):
                disparity_from_external(torch.rand(1, 4, 4) + 1, kind="depth", scale=scale, **{option: bad})


# ---------------------------------------------------------------------------------------------- CLI

def _float_options(parser):
    return [a.option_strings[0] for a in parser._actions if a.type is float]


def test_every_float_option_of_every_command_refuses_nan_and_infinity(tmp_path, capsys, monkeypatch):
    """All float options of render, demo, deblur and refocus (read from their parsers), before any work."""
    from genrefocus_core.cli import demo, generative, render
    from genrefocus_core.cli.options import INFINITY_ALLOWED

    photo, depth = photo_and_depth(tmp_path)
    for target in ("genrefocus_core.cli.render.load_image", "genrefocus_core.cli.generative._load",
                   "genrefocus_core.cli.demo.make_scene"):
        forbid(monkeypatch, target)
    commands = {
        "render": (render.build_parser(), ["--image", photo, "--depth", depth, "--out", tmp_path / "o.png"]),
        "refocus": (generative.build_parser("refocus"), ["--image", photo, "--out", tmp_path / "o.png",
                                                         "--bokeh-lora", photo, "--depth", depth]),
        "demo": (None, ["--out", tmp_path / "demo"]),
    }
    before = snapshot(tmp_path)
    checked = 0
    for command, (parser, base) in commands.items():
        options = _float_options(parser) if parser is not None else ["--K"]
        for option in options:
            dest = option.lstrip("-").replace("-", "_")
            for bad in ("nan", "inf", "-inf"):
                if bad == "inf" and dest in INFINITY_ALLOWED:
                    continue
                code, err = run_cli(capsys, command, *base, f"{option}={bad}")
                assert code == 1 and "must be a finite number" in err and dest.replace("_", "-") in err, \
                    (command, option, bad, err)
                checked += 1
    assert checked > 60
    assert snapshot(tmp_path) == before


def test_refocus_cli_refuses_a_non_finite_focus_before_loading(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "genrefocus_core.cli.generative._load")
    photo, depth = photo_and_depth(tmp_path)
    base = ["refocus", "--image", photo, "--out", tmp_path / "o.png", "--flux", photo, "--vae", photo,
            "--bokeh-lora", photo, "--depth", depth]
    for extra, problem in ((["--focus", "nan,3"], "--focus"), (["--focus-disparity", "inf"], "--focus-disparity"),
                           (["--focus-norm", "nan,0.5"], "finite")):
        code, err = run_cli(capsys, *base, *extra)
        assert code == 1 and problem in err, (extra, err)
