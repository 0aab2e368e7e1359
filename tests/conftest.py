import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "models" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/invariants.py


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.onnx"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
