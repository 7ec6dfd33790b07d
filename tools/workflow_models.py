"""Model metadata in the shipped workflows: every node whose widgets name a model file carries
`properties.models` entries (name, url, directory) from nodes/model_catalog.py, which the front end's
missing-models dialog lists with download links when the files are not installed.

    python tools/workflow_models.py            # write the entries into workflows/*.json
    python tools/workflow_models.py --check    # list widgets naming a model file without an entry (exit 1)

Run it after changing a workflow's loaders (e.g. switching to ComfyUI's own UNETLoader / VAELoader):
the entries follow the widget values, whatever the node type.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nodes.model_catalog import MODEL_FILES, looks_like_model_file  # noqa: E402


def _values(node: dict) -> list:
    v = node.get("widgets_values") or []
    return list(v.values()) if isinstance(v, dict) else list(v)


def stamp(ui: dict) -> dict:
    """Set properties.models on each node from the model files its widgets name (others are left alone)."""
    for node in ui.get("nodes", []):
        names = [v for v in _values(node) if isinstance(v, str) and v in MODEL_FILES]
        props = node.setdefault("properties", {})
        kept = [m for m in props.get("models", []) if m.get("name") not in MODEL_FILES]
        models = kept + [MODEL_FILES[n].metadata() for n in dict.fromkeys(names)]
        if models:
            props["models"] = models
        else:
            props.pop("models", None)
    return ui


def problems(ui: dict) -> list[str]:
    """Widget values that name a model file but have no catalog entry or no matching properties.models."""
    out = []
    for node in ui.get("nodes", []):
        listed = {m.get("name"): m for m in (node.get("properties") or {}).get("models", [])}
        for v in _values(node):
            if not looks_like_model_file(v):
                continue
            where = f"node {node.get('id')} ({node.get('type')}): '{v}'"
            if v not in MODEL_FILES:
                out.append(f"{where} is not in nodes/model_catalog.py")
            elif listed.get(v) != MODEL_FILES[v].metadata():
                out.append(f"{where} has no (or an outdated) properties.models entry")
    return out


def write_json(path: Path, data: dict) -> None:
    """As the front end saves workflows (2-space JSON), through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    files = args.files or sorted((ROOT / "workflows").glob("*.json"))
    bad = 0
    for path in files:
        ui = json.loads(path.read_text())
        if args.check:
            for p in problems(ui):
                print(f"{path.name}: {p}")
                bad += 1
        else:
            write_json(path, stamp(ui))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
