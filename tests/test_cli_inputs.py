"""Careless and hostile command lines: FIFOs, DICOMs without extension, very long names, an
existing file as --out, an empty model file. One line of error, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import DATA, REPO, needs_data

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


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "nih-cxr14" / "images").glob("*.png"))


def _limited(max_bytes: int):
    """A child whose files cannot grow past ``max_bytes`` (RLIMIT_FSIZE): writes beyond fail
    with EFBIG as they would with ENOSPC on a full disk, without root or a small file system."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))
    return limit


def test_odd_and_formula_file_names_go_through_the_batch(tmp_path):
    """A name that is not UTF-8 used to stop the whole batch; a name starting with '=' landed in
    the CSV as a formula."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES[0], os.fsencode(folder) + b"/bad\xff\xfename.png")
    shutil.copy(EXAMPLES[0], folder / "=HYPERLINK(1).png")
    (folder / "-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nothing")
    for fmt in ("csv", "json"):
        run = _run("predict", str(folder), "--out", str(tmp_path / fmt), "--format", fmt, "--backend", "torch")
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr  # 1: the broken file
        assert "3 of 3" not in run.stdout and "2 of 3 images" in run.stdout, run.stdout
        if fmt == "csv":
            import csv

            with open(tmp_path / fmt / "predictions.csv", newline="") as handle:
                rows = list(csv.reader(handle))[1:]
            assert sorted(r[0].rsplit("/", 1)[-1] for r in rows) == ["-broken.png", "=HYPERLINK(1).png",
                                                                   "bad\\xff\\xfename.png"]
            assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)
        else:
            records = [json.loads(x) for x in (tmp_path / fmt / "predictions.jsonl").read_text().splitlines()]
            named = {r["path"].rsplit("/", 1)[-1]: r for r in records}
            assert named["bad\\xff\\xfename.png"]["overlay"] == "bad\ufffd\ufffdname_overlay.png"
            assert (tmp_path / fmt / named["bad\\xff\\xfename.png"]["overlay"]).exists()


def test_an_out_folder_that_takes_nothing_is_refused_up_front(tmp_path):
    run = subprocess.run([*CLI, "predict", str(EXAMPLES[0]), "--out", str(tmp_path / "o"), "--backend", "torch"],
                         capture_output=True, text=True, check=False, timeout=300, preexec_fn=_limited(0))
    assert run.returncode == 2 and run.stderr.count("error:") == 1 and "cannot write to --out" in run.stderr, run.stderr
    assert not (tmp_path / "o" / "predictions.jsonl").exists()


def test_a_full_disk_keeps_every_finished_record_and_leaves_no_half_files(tmp_path):
    """Overlays do not fit (100 kB per file): the first film's record is kept with its overlay
    error, the batch stops with one line, no overlay is left truncated, no *.tmp stays."""
    films = [str(EXAMPLES[0]), str(EXAMPLES[1]), str(EXAMPLES[0])]
    out = tmp_path / "full"
    run = subprocess.run([*CLI, "predict", *films, "--out", str(out), "--backend", "torch"],
                         capture_output=True, text=True, check=False, timeout=300, preexec_fn=_limited(100_000))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.count("error:") == 1 and "stopped after 1 of 3 images" in run.stderr, run.stderr
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["overlay"] is None and "overlay not written" in records[0]["overlay_error"]
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "predictions.run.json"]
    # Records alone: the lines that fit stay whole, the one that did not is cut off
    run = subprocess.run([*CLI, "predict", *films, "--out", str(out), "--backend", "torch", "--no-overlays"],
                         capture_output=True, text=True, check=False, timeout=300, preexec_fn=_limited(7_000))
    text = (out / "predictions.jsonl").read_text()
    kept = [json.loads(x) for x in text.splitlines()]
    assert run.returncode == 1 and f"stopped after {len(kept)} of 3 images" in run.stderr, run.stderr
    assert 1 <= len(kept) < 3 and text.endswith("\n") and "Traceback" not in run.stderr


def test_a_second_run_in_the_same_folder_does_not_score_its_own_overlays(tmp_path):
    """`predict .` run twice used to score the first run's overlay pictures as chest films."""
    shutil.copy(EXAMPLES[0], tmp_path / "film.png")
    for _ in range(2):
        run = subprocess.run([*CLI, "predict", ".", "--out", "out", "--backend", "torch"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0 and "1 of 1 images" in run.stdout, run.stdout + run.stderr
    # and given on purpose, an overlay picture is refused by the gate: it is coloured
    run = _run("predict", str(tmp_path / "out" / "film_overlay.png"), "--out", str(tmp_path / "o2"),
               "--backend", "torch")
    record = json.loads((tmp_path / "o2" / "predictions.jsonl").read_text())
    assert record["quality"]["frontal_chest"] is False and record["probabilities"] is None
    assert any("colour picture" in reason for reason in record["quality"]["reasons"]), record["quality"]


def test_number_lists_of_fractions_betas_and_domain_weights_are_parsed_or_refused_in_one_line(capsys):
    """--fractions (three), --betas (two in [0, 1)) and --domain-weights (positive) share one
    parser; anything else is the option's one-line usage error."""
    import pytest
    import typer

    from pneumoscan.apps.cli.common import numbers

    assert numbers("0.8,0.08,0.12", "bad", 3) == (0.8, 0.08, 0.12)
    assert numbers("0.9,0.999", "bad", 2, lambda b: 0 <= b < 1) == (0.9, 0.999)
    assert numbers("1,2,16", "bad", valid=lambda w: w > 0) == (1.0, 2.0, 16.0)
    for text, count, valid in (("0.8,0.2", 3, None), ("0.8,,0.2", 3, None), ("a,b", 2, None),
                               ("0.9,1.0", 2, lambda b: 0 <= b < 1), ("1,0", None, lambda w: w > 0),
                               ("nan", None, lambda w: w > 0), ("1,2,", None, lambda w: w > 0), ("", None, None)):
        with pytest.raises(typer.Exit) as stop:
            numbers(text, f"--opt must be numbers, got {text!r}", count, valid or (lambda _: True))
        assert stop.value.exit_code == 2
        assert f"--opt must be numbers, got {text!r}" in capsys.readouterr().err


def test_a_misspelt_input_is_a_usage_error_before_any_model_loads(tmp_path):
    """Every given path missing: one line, exit 2, and no output folder made (it is answered
    before the models load)."""
    run = subprocess.run([*CLI, "predict", str(tmp_path / "flim.png"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no such file or folder" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_two_predicts_into_one_folder_and_onnx_with_a_model_are_refused(tmp_path):
    """Issue 36: a second `predict` into an --out another run is writing stops with one line
    (before any model loads) instead of overwriting its records; `--onnx DIR` with `--model` is
    refused rather than silently ignoring the model."""
    from pneumoscan.apps.cli.common import output_lock

    out = tmp_path / "out"
    out.mkdir()
    film = str(REPO / "examples" / "nih-cxr14" / "images" / "00001734_000.png")
    lock = output_lock(out)  # as a running predict holds it
    try:
        done = subprocess.run([*CLI, "predict", film, "--out", str(out)], capture_output=True, text=True, check=False,
                              timeout=120)
    finally:
        lock.release()
    assert done.returncode == 2 and "another PneumoScan run is writing to" in done.stderr
    assert "Traceback" not in done.stderr and not (out / "predictions.jsonl").exists()
    done = subprocess.run([*CLI, "predict", film, "--out", str(out), "--onnx", str(tmp_path), "--model", film],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2 and "--model and --seg-model would be ignored" in done.stderr


def test_a_calibrated_copy_is_another_set_of_models_for_a_resume(tmp_path):
    """Issue 36: a resumed run (and the results store) compare the models by their files' full
    SHA-256, thresholds included: a copy with other thresholds and the same description used to
    pass as the same models."""
    from pneumoscan.classify import load_default
    from pneumoscan.labels import LABELS
    from pneumoscan.predict import Predictor

    classifier = load_default()
    classifier.save(tmp_path / "same.pt")
    shipped = Predictor.from_paths(cls_model=tmp_path / "same.pt", backend="torch")
    classifier.set_assessment({label: {"assessed": bool(a), "threshold": float(t) * 0.9 if a else None}
                               for label, a, t in zip(LABELS, classifier.assessed, classifier.thresholds)})
    classifier.save(tmp_path / "copy.pt")
    copy = Predictor.from_paths(cls_model=tmp_path / "copy.pt", backend="torch")
    assert copy.models["files"]["classifier"] != shipped.models["files"]["classifier"]
    assert copy.models["classifier"] == shipped.models["classifier"]  # the same weights
    assert copy.models["files"]["segmentation"] == shipped.models["files"]["segmentation"]


def test_link_loops_and_dangling_links_in_an_input_folder_are_listed_and_the_batch_goes_on(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(REPO / "examples" / "nih-cxr14" / "images" / "00001734_000.png", folder / "a.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "up").symlink_to(tmp_path)  # a link to a folder above: not walked into (no endless walk)
    run = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "predict", str(folder), "--out",
                          str(tmp_path / "out"), "--cam", "none", "--no-overlays", "--quiet"],
                         capture_output=True, text=True, check=False, timeout=600)
    assert run.returncode == 1 and "Traceback" not in run.stderr  # 1: some inputs failed
    records = {Path(r["path"]).name: r for r in map(json.loads, (tmp_path / "out" / "predictions.jsonl").read_text().splitlines())}
    assert set(records) == {"a.png", "loop.png", "gone.png"}
    assert records["a.png"]["error"] is None and records["a.png"]["probabilities"]
    assert "symbolic links" in records["loop.png"]["error"] and "no such file" in records["gone.png"]["error"]


def test_every_error_a_user_can_act_on_shares_one_base():
    """The faces catch PneumoScanError and show its first line; each error a user can fix derives
    from it (and still from the built-in error it was, so older callers keep catching it)."""
    from pneumoscan.apps.cluster import ClusterError
    from pneumoscan.clinical import ClinicalError
    from pneumoscan.data import ManifestError, SourceError
    from pneumoscan.errors import PneumoScanError
    from pneumoscan.films import XrayReadError
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.readerstudy.ratings import RatingsError
    from pneumoscan.store.db import StoreError
    from pneumoscan.store.study import StudyError
    from pneumoscan.training.cache import CacheError

    for error in (ClusterError, ClinicalError, ManifestError, SourceError, XrayReadError, ModelFileError,
                  RatingsError, StoreError, StudyError, CacheError):
        assert issubclass(error, PneumoScanError), error
    assert issubclass(ModelFileError, ValueError) and issubclass(StoreError, RuntimeError)
