"""Progress on stderr: a bar with count and rate where a person waits, whole lines in a log, and
nothing with --quiet."""

from __future__ import annotations

import subprocess

from conftest import CLI, REPO


def test_progress_lines_in_a_log_and_nothing_with_quiet(tmp_path):
    examples = REPO / "examples"
    runs = {}
    for name, extra in (("shown", []), ("quiet", ["--quiet"])):
        runs[name] = subprocess.run([*CLI, "predict", str(examples), "--out", str(tmp_path / name), "--cam", "none",
                                     "--no-overlays", *extra], capture_output=True, text=True, check=False, timeout=600)
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
    shown, quiet = runs["shown"].stderr, runs["quiet"].stderr
    assert "predict: 100%" in shown and "3/3" in shown and "img/s" in shown
    assert "\r" not in shown  # stderr is a pipe here: whole lines, no in-place redraws
    assert "img/s" not in quiet and "predict:" not in quiet
    # the results are the same either way
    assert (tmp_path / "shown" / "predictions.jsonl").read_text().count("\n") == 3
    assert "3 of 3 images" in runs["quiet"].stdout


def test_the_bar_writes_whole_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    from pneumoscan import progress

    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    with progress.bar(4, "work") as shown:
        for _ in range(4):
            shown.update()
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n") and "4/4" in err.splitlines()[-1]
    monkeypatch.setenv(progress.QUIET_ENV, "1")
    with progress.bar(4, "work") as shown:
        shown.update(4)
    progress.note("status")
    assert capsys.readouterr().err == ""
