import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests (tests/test_properties.py): a CI-sized run by default, `--hypothesis-profile=long` for benchmarks.
settings.register_profile("ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "models" / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/invariants.py


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.onnx"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES

ZOO = ROOT / "models" / "zoo"


def zoo_model(name: str, exporter: str) -> Path:
    """A zoo model, exported on first use (needs the dev extra: torch, torchvision, onnxscript)."""
    path = ZOO / f"{name}_{exporter}.onnx"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "models"))
        import build_zoo  # noqa: E402 - only importable with the dev extra installed

        build_zoo.build(name, exporter, ZOO)
    return path
