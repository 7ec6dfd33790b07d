import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_paths import BOKEH_TOOLS, DEPTH_PRO_FIXTURES, PARITY_DIR, ROOT, SHARED  # noqa: E402,F401

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY_DIR / "manifest.json").exists():
        pytest.fail(f"Parity fixtures not found at {PARITY_DIR} (set GENREFOCUS_PARITY_DIR).")
    return PARITY_DIR


@pytest.fixture(scope="session")
def tiny_dir(parity_dir) -> Path:
    return parity_dir / "tiny"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
