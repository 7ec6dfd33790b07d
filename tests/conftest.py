import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("GENREFOCUS_SHARED_DIR", ROOT.parent / "shared"))
PARITY_DIR = Path(os.environ.get("GENREFOCUS_PARITY_DIR", SHARED / "fixtures" / "parity"))
DEPTH_PRO_FIXTURES = SHARED / "fixtures" / "depth_pro"
BOKEH_TOOLS = SHARED / "tools" / "bokeh"


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
