"""Shared test fixtures: where the real data lives, and a skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PNEUMOSCAN_DATA", REPO.parent / "shared" / "data")).resolve()

needs_data = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"real chest X-rays not found at {DATA} (set PNEUMOSCAN_DATA to ../shared/data)",
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real chest X-rays not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def siim_dicom(data_dir: Path) -> Path:
    """The one real chest X-ray DICOM in the shared data (CR, PA, MONOCHROME2, 8-bit)."""
    return next((data_dir / "siim-acr-pneumothorax").rglob("*.dcm"))


@pytest.fixture(scope="session")
def nih_png(data_dir: Path) -> Path:
    return data_dir / "nih-cxr14" / "images" / "00000100_000.png"
