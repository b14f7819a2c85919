"""Careless and hostile command lines: FIFOs, DICOMs without extension, very long names, an
existing file as --out, an empty model file. One line of error, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import DATA, needs_data

CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@needs_data
def test_folder_with_fifo_long_names_and_extensionless_dicom(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    film = DATA / "nih-cxr14" / "images" / "00000100_000.png"
    long_name = "x" * 247 + ".png"  # 251 bytes: NAME_overlay.png would pass 255
    shutil.copy(film, folder / long_name)
    shutil.copy(film, folder / "a.png")
    shutil.copy(next((DATA / "siim-acr-pneumothorax").rglob("*.dcm")), folder / "IM000123")  # no extension
    (folder / "notes.txt").write_text("not an image")
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    run = _run("segment", str(folder), "--out", str(tmp_path / "seg"), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pipe.png: not a regular file" in run.stderr and "Traceback" not in run.stderr
    records = [json.loads(line) for line in (tmp_path / "seg" / "segment.jsonl").read_text().splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in records) == sorted(["IM000123", "a.png", long_name])
    for record in records:  # every listed file exists, every name fits the file system
        for key in ("mask", "overlay"):
            assert (tmp_path / "seg" / record[key]).exists() and len(record[key].encode()) < 255


@needs_data
def test_out_naming_a_file_and_an_empty_model_are_one_line_errors(tmp_path):
    film = str(DATA / "nih-cxr14" / "images" / "00000100_000.png")
    (tmp_path / "taken").write_text("")
    (tmp_path / "empty.pt").write_bytes(b"")
    for args in (("predict", film, "--out", str(tmp_path / "taken")),
                 ("segment", film, "--out", str(tmp_path / "taken")),
                 ("predict", film, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "empty.pt")),
                 ("segment", film, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "empty.pt"))):
        run = _run(*args)
        assert run.returncode == 2, (args, run.stderr)
        assert "Traceback" not in run.stderr and run.stderr.count("error:") == 1, run.stderr


def test_serve_without_key_off_loopback_is_refused():
    run = _run("serve", "--host", "0.0.0.0", "--port", "1")
    assert run.returncode == 2 and "--api-key" in run.stderr


def test_error_messages_keep_square_brackets(capsys):
    """`pip install 'pneumoscan[web]'` must reach the user whole (console markup used to eat it)."""
    import typer

    from pneumoscan.apps.cli import fail

    try:
        fail("the server needs the web extra: pip install 'pneumoscan[web]'")
    except typer.Exit as exc:
        assert exc.exit_code == 2
    assert "pip install 'pneumoscan[web]'" in capsys.readouterr().err
