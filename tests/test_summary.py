"""A folder's summary and triage sheet: statuses that add up, the CSV's status and thresholds, and
the sheet in headless Chromium (bundled examples only)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscan.labels import LABELS
from pneumoscan.outputs.summary import VERDICT_ORDER
from pneumoscan.outputs.writer import CSV_TAIL
from pneumoscan.reading import VERDICTS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CLI = [sys.executable, "-m", "pneumoscan.apps.cli"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The three examples, an unreadable file and a coloured overlay picture (refused)."""
    root = tmp_path_factory.mktemp("triage")
    films = root / "films"
    shutil.copytree(EXAMPLES, films, ignore=shutil.ignore_patterns("*.csv", "*.md"))
    (films / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    first = subprocess.run([*CLI, "predict", str(EXAMPLES / "nih-cxr14" / "images" / "00001734_000.png"), "--out",
                            str(root / "first")], capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    shutil.copy(root / "first" / "00001734_000_overlay.png", films / "overlay.png")
    return root


def test_statuses_add_up_in_the_summary_the_csv_and_stderr(folder):
    run = subprocess.run([*CLI, "predict", str(folder / "films"), "--out", str(folder / "csv"), "--format", "csv"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 1  # the unreadable file
    summary = json.loads((folder / "csv" / "summary.json").read_text())
    assert summary["images"] == 5 and sum(summary["by_status"].values()) == 5
    assert summary["by_status"]["error"] == 1 and summary["by_status"]["refused"] == 1
    with open(folder / "csv" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    status = {Path(r["path"]).name: r["status"] for r in rows}
    assert status["broken.png"] == "error" and status["overlay.png"] == "refused"
    assert {status[n] for n in ("00000129_000.png", "00001734_000.png")} <= {"called", "not called"}
    scored = next(r for r in rows if r["status"] in ("called", "not called"))
    thresholds = json.loads(scored["thresholds"])
    assert thresholds and all(scored[label] != "" for label in thresholds)  # assessed: a number each
    assert list(rows[0]) == ["path", *LABELS, *CSV_TAIL]
    called = [r for r in rows if r["status"] == "called"]
    for row in called:  # called means a finding other than No Finding at or above its threshold
        assert any(float(row[k]) >= t for k, t in json.loads(row["thresholds"]).items() if k != "No Finding")
    assert f"{summary['by_status']['called']} called" in run.stderr and "triage.html" in run.stderr
    verdicts = {Path(r["path"]).name: r["verdict"] for r in rows}
    assert verdicts["broken.png"] == "" and verdicts["overlay.png"] == ""  # not scored: no verdict
    scored_names = [n for n, st in status.items() if st in ("called", "not called")]
    assert {verdicts[n] for n in scored_names} <= set(VERDICTS)
    assert all((verdicts[n] == "abnormal") == (status[n] == "called") for n in scored_names)
    assert sum(summary["by_verdict"].values()) == len(scored_names) and "verdicts:" in run.stderr
    child = next(r for r in rows if "person1000" in r["path"])  # the Kermany example
    assert child["population"] == "paediatric" and child["age_source"] == "estimate" and child["Cardiomegaly"] == ""


def test_triage_sheet_in_headless_chromium(folder, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("PNEUMOSCAN_REQUIRE_VALIDATORS"):
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    run = subprocess.run([*CLI, "predict", str(folder / "films"), "--out", str(folder / "json")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 1
    records = {Path(json.loads(x)["path"]).name: json.loads(x)
               for x in (folder / "json" / "predictions.jsonl").read_text().splitlines()}
    artifacts = Path(os.environ.get("PNEUMOSCAN_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((folder / "json" / "triage.html").as_uri())
        page.wait_for_load_state("load")
        rows = page.locator("tbody tr")
        assert rows.count() == 5
        names = [rows.nth(i).locator("td.name").inner_text().splitlines()[0] for i in range(5)]
        statuses = [rows.nth(i).locator("td.status").inner_text() for i in range(5)]
        assert set(statuses[-2:]) == {"refused", "error"}  # unscored films last
        order = VERDICT_ORDER  # abnormal, then nothing called (indeterminate or no finding called), then normal
        assert [order[v] for v in statuses[:3]] == sorted(order[v] for v in statuses[:3])
        assert all(records[n]["verdict"] == v for n, v in zip(names[:3], statuses[:3]))
        assert "abnormal" in statuses  # the Kermany example is called Pneumonia: this order is tested
        loaded = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded == sum(1 for r in records.values() if r.get("overlay"))
        widest = page.evaluate("document.documentElement.scrollWidth")
        assert widest <= 1400, f"the sheet is {widest} px wide in a 1,400 px window"
        page.screenshot(path=str(artifacts / "triage.png"), full_page=True)
        browser.close()
    assert (artifacts / "triage.png").stat().st_size > 30_000


def test_a_file_name_never_becomes_a_script_link_in_the_triage_sheet():
    """Issue 36: the overlay's link is percent-encoded behind ./ (a film named
    ``javascript:alert(1)//`` made ``href="javascript:alert(1)//_overlay.png"``, a script URL)."""
    import re

    from pneumoscan.outputs.summary import summarise, triage_html

    row = {"path": "javascript:alert(1)//.png", "status": "not called", "overlay": "javascript:alert(1)//_overlay.png",
           "verdict": "normal", "population": "adult", "probabilities": {"Pneumonia": 0.1}, "thresholds": {"Pneumonia": 0.5},
           "findings": ["No Finding"], "explanations": "", "masks": "", "reason": ""}
    page = triage_html([row], summarise([row]), "t")
    links = re.findall(r'(?:href|src)="([^"]*)"', page)
    assert links == ["./javascript%3Aalert%281%29%2F%2F_overlay.png"] * 2
