"""The core's layers, read from the import statements of every module (no module is executed):

- `genrefocus_core` never imports ComfyUI (`comfy`, `folder_paths`, ...) or the pack's `nodes`;
- `basics` imports no family; a family (`generative`, `classical`, `depth`) imports basics and itself only;
- only `cli` (and the package's `__main__`) may combine families.
"""
import ast
from pathlib import Path

from fixture_paths import ROOT

CORE = ROOT / "genrefocus_core"
FAMILIES = {"generative", "classical", "depth"}
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "nodes", "node_helpers"}


def _imports(path: Path, source: str = None):
    """Absolute dotted names imported by `path` (relative imports resolved against its package)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if node.module is None or node.level:
                # `from . import x` / `from .. import x` may name submodules: count each
                for alias in node.names:
                    yield f"{prefix}.{alias.name}" if node.module is None else prefix
            else:
                yield prefix


def _family(dotted: str):
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "genrefocus_core" else None


def test_core_never_imports_comfyui_or_nodes():
    bad = []
    for path in CORE.rglob("*.py"):
        for name in _imports(path):
            if name.split(".")[0] in COMFY_MODULES:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_basics_import_no_family_and_families_not_each_other():
    bad = []
    for path in CORE.rglob("*.py"):
        own = path.relative_to(CORE).parts[0] if len(path.relative_to(CORE).parts) > 1 else None
        if own in (None, "cli"):
            continue
        for name in _imports(path):
            target = _family(name)
            if target is None or target == own or target == "basics" or target not in FAMILIES | {"cli"}:
                continue
            bad.append(f"{path.relative_to(ROOT)} ({own}) imports {name} ({target})")
    assert not bad, "\n".join(bad)


def test_layer_check_sees_a_violation():
    """The check above can fail: a basics module importing the classical renderer is seen as such."""
    probe = CORE / "basics" / "probe.py"
    names = list(_imports(probe, "from ..classical.renderer import render_bokeh\nfrom . import images\n"))
    assert names == ["genrefocus_core.classical.renderer", "genrefocus_core.basics.images"]
    assert _family(names[0]) == "classical"
