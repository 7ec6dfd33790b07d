"""The lower bounds CI installs (.ci/lower-bounds.txt) are exactly those of the requirements files."""
import re

from fixture_paths import ROOT

REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([^\s,;#]+)\s*(?:#.*)?$")


def _lines(path):
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def _lower_bounds(path, seen=None) -> dict:
    """{name: version} of every 'name>=version' in a requirements file and the files it includes (-r)."""
    seen = set() if seen is None else seen
    if path in seen:
        return {}
    seen.add(path)
    bounds = {}
    for line in _lines(path):
        if line.startswith("-r "):
            bounds.update(_lower_bounds(path.parent / line[3:].strip(), seen))
            continue
        m = REQUIREMENT.match(line)
        assert m, f"{path.name}: '{line}' is not 'name>=version' (lower bounds only, never pins)"
        bounds[m.group(1).lower()] = m.group(2)
    return bounds


def test_lower_bounds_file_matches_the_requirements():
    required = {}
    for name in ("requirements.txt", "requirements-standalone.txt", "requirements-dev.txt"):
        required.update(_lower_bounds(ROOT / name))
    assert "torch" not in _lower_bounds(ROOT / "requirements.txt")  # ComfyUI's own torch is kept
    required.pop("torch")  # CI installs the local CPU build instead of torch's lower bound
    pinned = dict(line.split("==") for line in _lines(ROOT / ".ci" / "lower-bounds.txt"))
    assert {k.lower(): v for k, v in pinned.items()} == required
