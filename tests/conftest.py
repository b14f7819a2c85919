"""Shared test fixtures: where the real data lives, and a skip with a reason when it is absent."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

# ONNX exports made by the default backend go to a cache private to this test session (shared by
# the CLI subprocesses it starts), never into the developer's ~/.cache.
os.environ["PNEUMOSCAN_CACHE"] = tempfile.mkdtemp(prefix="pneumoscan-test-cache-")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PNEUMOSCAN_DATA", REPO.parent / "shared" / "data")).resolve()

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]

#: CI sets PNEUMOSCAN_REQUIRE_DATA=1: there, missing data is a failure, never a quiet skip.
REQUIRE_DATA = os.environ.get("PNEUMOSCAN_REQUIRE_DATA", "") not in ("", "0")
MISSING = f"real chest X-rays not found at {DATA} (set PNEUMOSCAN_DATA to ../shared/data)"

needs_data = pytest.mark.skipif(not DATA.is_dir() and not REQUIRE_DATA, reason=MISSING)


def pytest_configure(config) -> None:
    if REQUIRE_DATA and not DATA.is_dir():
        raise pytest.UsageError(f"PNEUMOSCAN_REQUIRE_DATA is set but {MISSING}")


def pytest_terminal_summary(terminalreporter) -> None:
    """Say once, at the end, how many tests the missing data skipped and how to run them."""
    if DATA.is_dir():
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if MISSING in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} tests skipped: {MISSING}. They read real chest X-rays: place this clone beside "
            f"the shared folder (../shared/data) or point PNEUMOSCAN_DATA at the data; CI requires them.", yellow=True)


def skip_without_data() -> None:
    """Skip (or, under PNEUMOSCAN_REQUIRE_DATA, fail) a test or fixture that needs the data."""
    if not DATA.is_dir():
        (pytest.fail if REQUIRE_DATA else pytest.skip)(MISSING)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    skip_without_data()
    return DATA


@pytest.fixture(scope="session")
def siim_dicom(data_dir: Path) -> Path:
    """The one real chest X-ray DICOM in the shared data (CR, PA, MONOCHROME2, 8-bit)."""
    return next((data_dir / "siim-acr-pneumothorax").rglob("*.dcm"))


@pytest.fixture(scope="session")
def nih_png(data_dir: Path) -> Path:
    return data_dir / "nih-cxr14" / "images" / "00000100_000.png"


#: The labels the test classifier assesses (the shipped classifier's own list may differ).
TEST_ASSESSED = {"Pneumonia": 0.5, "No Finding": 0.5}


@pytest.fixture(scope="session")
def assessed_model(tmp_path_factory) -> Path:
    """The shipped classifier's weights with a known assessment: Pneumonia and No Finding
    assessed at 0.5, the other 13 labels not assessed."""
    from pneumoscan.classify import load_default
    from pneumoscan.labels import LABELS

    classifier = load_default()
    classifier.set_assessment({label: {"assessed": label in TEST_ASSESSED,
                                       "threshold": TEST_ASSESSED.get(label)} for label in LABELS})
    path = tmp_path_factory.mktemp("models") / "assessed.pt"
    classifier.save(path)
    return path


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory) -> Path:
    """NIH + COVID + Actualmed + every 40th Kermany image, and one unreadable file."""
    from pneumoscan.data import build_manifest, write_manifest

    skip_without_data()
    root = tmp_path_factory.mktemp("manifest")
    table = build_manifest({"nih": DATA / "nih-cxr14", "covid": DATA / "covid-chestxray",
                            "actualmed": DATA / "actualmed-covid", "kermany": DATA / "kermany"})
    kermany = table[table.source == "kermany"].iloc[::40]
    table = pd.concat([table[table.source != "kermany"], kermany], ignore_index=True)
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    extra = table.iloc[[0]].assign(path=str(broken), patient="nih:broken")
    table = pd.concat([table, extra], ignore_index=True)
    write_manifest(table, root / "manifest.csv")
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def cache64(small_manifest, tmp_path_factory) -> Path:
    """`pneumoscan prepare` of the small manifest at 64 px."""
    out = tmp_path_factory.mktemp("cache") / "c64"
    result = subprocess.run([*CLI, "prepare", "--manifest", str(small_manifest), "--out", str(out),
                             "--size", "64", "--shard-size", "64", "--workers", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


#: Debian's PostgreSQL server programs (``apt-get install postgresql``; .ci/run installs it).
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None) \
    if Path("/usr/lib/postgresql").is_dir() else None


def start_postgres() -> tuple[str, callable]:
    """A throw-away PostgreSQL cluster in a new temporary folder (one the ``postgres`` user can
    reach) on a free loopback port, run as that user when the tests run as root (postgres refuses
    root): its URL and a stop function (which also removes the folder). Fails (CI:
    PNEUMOSCAN_REQUIRE_VALIDATORS) or skips when PostgreSQL is missing."""
    import shutil
    import socket

    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        (pytest.fail if os.environ.get("PNEUMOSCAN_REQUIRE_VALIDATORS") else pytest.skip)(
            "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    folder = Path(tempfile.mkdtemp(prefix="pneumoscan-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
                    f"-k {folder} -p {port} -h 127.0.0.1", "start"], check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)

    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One PostgreSQL server for the session's tests (each test makes its own database in it)."""
    url, stop = start_postgres()
    yield url
    stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A new, empty results store: a SQLite file, or a database of its own on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite'}"
    import uuid

    import psycopg

    server = request.getfixturevalue("postgres")
    name = "t" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + "/" + name
