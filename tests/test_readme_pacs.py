"""The README's "Connecting to a PACS" block, run as written (from a folder that holds the
repository's examples), with Debian's dcmtk as the sender."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("pynetdicom", reason="the dicom extra is not installed")
pytestmark = pytest.mark.slow


def _block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Connecting to a PACS"):]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_pacs_block_runs_as_written(tmp_path):
    for tool in ("/usr/bin/echoscu", "/usr/bin/storescu", "/usr/bin/img2dcm"):
        if not Path(tool).exists():
            if os.environ.get("PNEUMOSCAN_REQUIRE_VALIDATORS"):
                pytest.fail(f"{tool} (Debian's dcmtk) is not installed")
            pytest.skip("Debian's dcmtk is not installed")
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 11112)) == 0:
            pytest.fail("port 11112, which the README's block uses, is taken on this machine")
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert shutil.which("pneumoscan", path=env["PATH"])
    run = subprocess.run(["bash", "-c", _block()], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (record,) = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert record["status"] in ("called", "not called", "refused") and "sc" in record["results"]
    assert (tmp_path / "pacs-results" / f"{record['results']['sc']}_sc.dcm").exists()
