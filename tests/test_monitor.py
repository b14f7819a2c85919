"""Watching a site (pneumoscan.monitoring): the tests and estimates against independent
computations, a stable stream that raises no alert, changes that do, and `pneumoscan monitor` on a
real store."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from pneumoscan.monitoring.stats import categorical_shift, continuous_shift, expected_auc, expected_performance
from pneumoscan.monitoring.watch import film_row, monitor

from conftest import needs_data

START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_expected_auc_is_the_weighted_pair_count():
    """Against the brute-force sum over every ordered pair, ties counted half."""
    rng = np.random.default_rng(1)
    p = rng.random(40)
    order = np.round(rng.random(40), 1)  # many ties
    right = total = 0.0
    for i in range(40):
        for j in range(40):
            if i != j:
                w = p[i] * (1 - p[j])
                total += w
                right += w * (1.0 if order[i] > order[j] else 0.5 if order[i] == order[j] else 0.0)
    assert expected_auc(p, order) == pytest.approx(right / total, abs=1e-12)


def test_expected_performance_matches_the_truth_on_average_when_calibrated():
    """Films whose truth is drawn from their calibrated probability: the expected sensitivity,
    specificity and AUC match the observed ones over many films."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    p = 1 / (1 + np.exp(-rng.normal(-1, 1.5, 20000)))
    truth = rng.random(len(p)) < p
    called = p >= 0.5
    figures = expected_performance(p, called, p)
    assert figures["expected_sensitivity"] == pytest.approx(called[truth].mean(), abs=0.01)
    assert figures["expected_specificity"] == pytest.approx((~called[~truth]).mean(), abs=0.01)
    assert figures["expected_auc"] == pytest.approx(roc_auc_score(truth, p), abs=0.01)


def test_the_two_sample_tests_see_a_shift_and_not_its_absence():
    rng = np.random.default_rng(3)
    same = continuous_shift(rng.normal(0, 1, 500), rng.normal(0, 1, 100))
    moved = continuous_shift(rng.normal(0, 1, 500), rng.normal(1, 1, 100))
    assert same["p"] > 0.01 and moved["p"] < 1e-6 and moved["d"] > 0.3
    mix = ["adult"] * 480 + ["paediatric"] * 20
    assert categorical_shift(mix, ["adult"] * 96 + ["paediatric"] * 4)["p"] > 0.05
    shifted = categorical_shift(mix, ["adult"] * 50 + ["paediatric"] * 50)
    assert shifted["p"] < 1e-10 and shifted["moved"] == "paediatric" and shifted["tvd"] == pytest.approx(0.46)


def record(rng, *, child: bool = False, inverted: bool = False, size: int = 2048, view: str = "PA") -> dict:
    """A stored record with the fields the monitor reads, drawn like a site's films."""
    p = {"Cardiomegaly": None if child else float(rng.beta(1, 30)), "Pneumonia": float(rng.beta(1, 40 if not child else 2)),
         "No Finding": float(rng.beta(5, 5))}
    thresholds = {"Cardiomegaly": None if child else 0.0565, "Pneumonia": 0.021, "No Finding": None}
    findings = [k for k, v in p.items() if v is not None and thresholds[k] is not None and v >= thresholds[k]]
    shift = 30 if child else 0
    return {"status": "called" if findings else "not called", "verdict": "abnormal" if findings else "no finding called",
            "population": {"group": "paediatric" if child else "adult", "age": 3.0 if child else float(rng.normal(50, 15)),
                           "source": "estimate"},
            "probabilities": p, "thresholds": thresholds, "findings": findings,
            "rank_scores": {k: float(np.clip(rng.normal(50 + shift, 20), 0, 100)) for k, v in p.items() if v is not None},
            "image": {"format": "dicom", "width": size, "height": size, "bit_depth": 12, "view_position": view,
                      "modality": "CR", "photometric": "MONOCHROME1" if inverted else "MONOCHROME2"},
            "quality": {"frontal_chest": True, "reasons": []},
            "mask_quality": {"lungs": float(rng.beta(30, 2)), "heart": float(rng.beta(20, 3))},
            "measurements": {"cardiothoracic_ratio": float(rng.normal(0.48, 0.05))}}


def stream(n: int, seed: int, **change) -> list:
    rng = np.random.default_rng(seed)
    return [film_row(k, START + timedelta(hours=k), record(rng, **change)) for k in range(n)]


def test_a_stable_stream_raises_no_alert_and_each_change_does_within_one_window():
    """2,000 ordinary films after a reference of 500, windows of 100: no alert; children, an
    inverting PACS, downscaled films or a switch to AP films are each flagged in the first
    window after they start, with the films to look at."""
    quiet = monitor(stream(2500, 4), reference=500, window=100)
    assert quiet["alerts"] == [] and len(quiet["windows"]) == 20
    for change, statistic in (({"child": True}, "population"), ({"inverted": True}, "photometric"),
                              ({"size": 256}, "log_pixels"), ({"view": "AP"}, "view")):
        rows = stream(1000, 5) + stream(100, 6, **change)
        for k, row in enumerate(rows):
            row.result_id, row.created_at = k, START + timedelta(hours=k)
        report = monitor(rows, reference=500, window=100)
        first = [a for a in report["alerts"] if a["window"] == 5]
        assert statistic in {a["statistic"] for a in first}, (change, [a["what"] for a in report["alerts"]])
        assert not [a for a in report["alerts"] if a["window"] < 5]
        assert all(1000 <= i < 1100 for a in first for i in a["films"])


def test_expected_performance_follows_a_change_the_calibration_did_not_see():
    """Children arrive: their Pneumonia probabilities are high and the expected prevalence rises."""
    rows = stream(600, 7) + stream(100, 8, child=True)
    report = monitor(rows, reference=500, window=100)
    before, after = report["windows"][0]["performance"]["Pneumonia"], report["windows"][1]["performance"]["Pneumonia"]
    assert after["expected_prevalence"] > 5 * before["expected_prevalence"]
    assert report["windows"][1]["performance"].get("Cardiomegaly") is None  # not assessed for children


@needs_data
def test_pneumoscan_monitor_reads_a_real_store(tmp_path, data_dir):
    """Real predictions stored, then `monitor` writes monitor.json and monitor.html, says when the
    store is too small, and refuses a store that does not exist."""
    from pneumoscan.outputs.writer import write_to_store
    from pneumoscan.predict import Predictor
    from pneumoscan.store.db import Store

    films = sorted((data_dir / "nih-cxr14" / "images").glob("*.png"))[:24] + \
        sorted((data_dir / "kermany" / "train" / "PNEUMONIA").glob("*.jpeg"))[:12]
    predictor = Predictor.from_default()
    url = f"sqlite:///{tmp_path / 'site.sqlite'}"
    with Store(url) as store:
        for path, result in zip(films, predictor.predict_many(films)):
            write_to_store(store, result.to_dict(), result, None, name=path.name, path=path,
                           run=predictor.run_identity(), source="predict")
    cli = [sys.executable, "-m", "pneumoscan.apps.cli", "monitor", "--db", url]
    done = subprocess.run([*cli, "--out", str(tmp_path / "m"), "--reference", "24", "--window", "20"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "m" / "monitor.json").read_text())
    assert report["reference"]["films"] == 24 and report["windows"][0]["films"] == 12
    assert "population" in {a["statistic"] for a in report["alerts"]}  # the children are seen
    assert "<img" in (tmp_path / "m" / "monitor.html").read_text()
    flagged = subprocess.run([*cli, "--out", str(tmp_path / "m2"), "--reference", "24", "--window", "20",
                              "--fail-on-alert"], capture_output=True, text=True, timeout=300, check=False)
    assert flagged.returncode == 3
    small = subprocess.run([*cli, "--out", str(tmp_path / "m3")], capture_output=True, text=True, timeout=300, check=False)
    assert small.returncode == 2 and "nothing is left to watch" in small.stderr and "Traceback" not in small.stderr
    missing = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "monitor", "--db", str(tmp_path / "no.sqlite"),
                              "--out", str(tmp_path / "m4")], capture_output=True, text=True, timeout=300, check=False)
    assert missing.returncode == 2 and "no results store" in missing.stderr


def test_the_monitor_page_shows_the_alerts_in_chromium(tmp_path):
    """/monitor on a server with a store: a reader signs in with their key and sees the alert for
    children arriving, with links that open the films on /review, and the plots."""
    import os
    import shutil

    from playwright.sync_api import sync_playwright
    from test_review_page import LiveServer

    from pneumoscan.apps.server import create_app
    from pneumoscan.predict import Predictor
    from pneumoscan.store.db import Store
    from pneumoscan.store.records import FilmIdentity

    chromium = shutil.which("chromium")
    if chromium is None:
        (pytest.fail if os.environ.get("PNEUMOSCAN_REQUIRE_VALIDATORS") else pytest.skip)(
            "Debian's chromium is not installed (.ci/run installs it)")
    rng = np.random.default_rng(11)
    store = Store(f"sqlite:///{tmp_path / 'site.sqlite'}")
    for k in range(300):
        film = FilmIdentity(sha256=f"{k:064x}", display_name=f"film{k}.dcm")
        store.add_result(record(rng, child=k >= 250), film, {"classifier": "test"}, "listen", None)
    key = store.add_reader("ann")
    with LiveServer(create_app(Predictor.from_default(), store=store, allowed_hosts=None)) as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/monitor")
        page.fill("#readerkey", key)
        page.fill("#reference", "200")
        page.fill("#window", "50")
        page.click("#run")
        page.wait_for_selector("#alerts table", timeout=60_000)
        text = page.inner_text("#alerts")
        assert "population: 'paediatric'" in text
        link = page.locator("#alerts a").first.get_attribute("href")
        assert link.startswith("/review#result=") and int(link.split("=")[1]) > 250
        assert page.get_attribute("#drift", "src").startswith("data:image/png;base64,")
        artifacts = os.environ.get("PNEUMOSCAN_ARTIFACTS")
        if artifacts:
            page.screenshot(path=os.path.join(artifacts, "monitor_page.png"), full_page=True)
        assert not errors, errors
        browser.close()
    store.close()


def test_monitor_reads_sqlite_and_postgresql_alike(db_url, tmp_path):
    """The same stored results give the same report on both databases, and reviews count as truth."""
    from pneumoscan.monitoring import read_store
    from pneumoscan.store.db import Store
    from pneumoscan.store.records import FilmIdentity
    from pneumoscan.store.review import check_review

    rng = np.random.default_rng(12)
    with Store(db_url) as store:
        ids = [store.add_result(record(rng, child=k >= 250), FilmIdentity(sha256=f"{k:064x}", display_name=f"f{k}.dcm"),
                                {"classifier": "test"}, "listen", None) for k in range(300)]
        reader = store.reader_by_name("ann", create=True)
        stored = store.result_for_review(ids[0])
        verdicts = {label: "agree" if (label == "Pneumonia") == (label in stored["findings"]) else "disagree"
                    for label, t in stored["thresholds"].items() if t is not None}
        store.add_review(ids[0], reader, check_review({"verdicts": verdicts, "labels": ["Pneumonia"]}, stored))
        rows, truth = read_store(store, batch=64)
    assert [r.result_id for r in rows] == ids and truth[ids[0]]["Pneumonia"] == 1.0
    report = monitor(rows, reference=200, window=50, truth=truth)
    assert [a["statistic"] for a in report["alerts"] if a["statistic"] == "population"] == ["population"]
    assert report["alerts"][0]["window"] == 1 and min(report["alerts"][0]["films"]) > ids[249]
    done = subprocess.run([sys.executable, "-m", "pneumoscan.apps.cli", "monitor", "--db", db_url, "--out",
                           str(tmp_path / "m"), "--reference", "200", "--window", "50", "--every", "2d"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "alerts" in done.stdout, done.stderr
