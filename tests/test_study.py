"""Reader studies in the store: the seeded plans, the rules of reading (order, no re-rating, the
unaided arm never sees the model, the washout), the analysis of a study in the store, and a
2-reader, 2-arm, 40-case crossover study read end to end in Debian's chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from pneumoscan.outputs.writer import write_to_store
from pneumoscan.predict import Predictor
from pneumoscan.store.db import Store
from pneumoscan.store.schema import StudyCase, StudyRating, StudyStep
from pneumoscan.store.study import (
    ARMS,
    StudyError,
    Waiting,
    correct,
    create_study,
    next_step,
    plan_steps,
    rate,
)

from conftest import CLI, needs_data

CASES = 40
TARGET = "Effusion"


def test_plans_are_seeded_and_follow_the_design():
    cases = list(range(10, 20))
    sequential = plan_steps(cases, 2, "sequential", seed=5)
    for plan in sequential:  # each case unaided, then at once aided
        assert [arm for _, arm, _ in plan] == list(ARMS) * len(cases)
        assert all(plan[i][0] == plan[i + 1][0] for i in range(0, len(plan), 2))
        assert sorted(c for c, arm, _ in plan if arm == "aided") == cases
    assert [c for c, _, _ in sequential[0]] != [c for c, _, _ in sequential[1]]  # each reader their own order
    assert plan_steps(cases, 2, "sequential", seed=5) == sequential and plan_steps(cases, 2, "sequential", seed=6) != sequential
    crossover = plan_steps(cases, 3, "crossover", seed=5)
    for k, plan in enumerate(crossover):
        first = "unaided" if k % 2 == 0 else "aided"  # every second reader starts aided
        assert [arm for _, arm, _ in plan[:10]] == [first] * 10 and {arm for _, arm, _ in plan[10:]} == set(ARMS) - {first}
        assert [w for _, _, w in plan] == [False] * 10 + [True] + [False] * 9
        assert [c for c, _, _ in plan[:10]] != [c for c, _, _ in plan[10:]]  # a new order after the washout


@pytest.fixture(scope="module")
def study_store(tmp_path_factory, data_dir):
    """40 adult NIH films predicted and stored; their NIH truth for Effusion."""
    table = pd.read_csv(data_dir / "nih-cxr14" / "Data_Entry_2017.csv")
    images = {p.name for p in (data_dir / "nih-cxr14" / "images").iterdir()}
    table = table[table["Image Index"].isin(images) & (table["Patient Age"] >= 18)].sort_values("Image Index")
    positive = table["Finding Labels"].str.contains(TARGET)
    chosen = pd.concat([table[positive].head(15), table[~positive].head(CASES - 15)])
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('study') / 'results.sqlite'}")
    predictor = Predictor.from_default()
    run = predictor.run_identity()
    paths = [data_dir / "nih-cxr14" / "images" / name for name in chosen["Image Index"]]
    cases = []
    for path, result, label in zip(paths, predictor.predict_many(paths, cam="top", keep_arrays=True), chosen["Finding Labels"]):
        record = write_to_store(store, result.to_dict(), result, None, name=path.name, path=path, run=run, source="study")
        cases.append((record["store_id"], {TARGET: int(TARGET in label)}))
    for name in ("ann", "bob", "cy"):
        store.reader_by_name(name, create=True)
    yield store, cases, predictor
    store.close()


def shift_back(store: Store, days: float) -> None:
    """As if every rating so far had been given ``days`` earlier (a washout passes in a test)."""
    with store.session("test") as session:
        for rating in session.scalars(select(StudyRating)).all():
            rating.created_at = rating.created_at - timedelta(days=days)


@needs_data
def test_the_rules_of_reading(study_store, tmp_path):
    """Only the current step can be rated, never twice; the unaided arm carries nothing of the
    model; the washout holds the second arm back; a correction is recorded beside the first."""
    store, cases, _ = study_store
    small = [c for c in cases if c[1][TARGET]][:3] + [c for c in cases if not c[1][TARGET]][:3]
    create_study(store, "rules", design="crossover", targets=[TARGET], readers=["ann", "bob"], cases=small, seed=1)
    with pytest.raises(StudyError, match="exists already"):
        create_study(store, "rules", design="crossover", targets=[TARGET], readers=["ann", "bob"], cases=small)
    with pytest.raises(StudyError, match="no such readers: zed"):
        create_study(store, "other", design="sequential", targets=[TARGET], readers=["ann", "zed"], cases=small)
    ann, bob = store.reader_by_name("ann"), store.reader_by_name("bob")
    with pytest.raises(PermissionError):
        next_step(store, "rules", store.reader_by_name("cy"))
    first = next_step(store, "rules", ann)["step"]
    assert first["arm"] == "unaided" and not {"model", "layers"} & set(first)
    assert next_step(store, "rules", bob)["step"]["arm"] == "aided"  # bob starts aided
    aided = next_step(store, "rules", bob)["step"]
    assert set(aided["model"][TARGET]) == {"probability", "threshold", "called"}
    # the target's own map or none (then named as missing), never another label's; the heart's ratio or why none
    assert set(aided["layers"]["heat"]) <= {TARGET} and (TARGET in aided["missing_maps"]) == (not aided["layers"]["heat"])
    assert aided["heart"]["cardiothoracic_ratio"] is not None or aided["heart"]["reason"]
    other_maps = [store.result_view(c[0], None)["layers"]["heat"] for c in small]
    assert any(set(m) - {TARGET} for m in other_maps)  # the stored results do hold other labels' maps
    with pytest.raises(StudyError, match="in the order given"):
        rate(store, "rules", ann, first["step_id"] + 1, {TARGET: {"score": 50, "call": False}})
    with pytest.raises(StudyError, match="0 to 100"):
        rate(store, "rules", ann, first["step_id"], {TARGET: {"score": 150, "call": False}})
    for n in range(6):
        step = next_step(store, "rules", ann)["step"]
        rate(store, "rules", ann, step["step_id"], {TARGET: {"score": 10.0 * n, "call": n > 2}}, seconds=3)
    with pytest.raises(StudyError, match="already rated"):
        rate(store, "rules", ann, first["step_id"], {TARGET: {"score": 50, "call": True}})
    waiting = next_step(store, "rules", ann)
    assert waiting["step"] is None and waiting["done"] == 6 and waiting["waiting_until"]
    with pytest.raises(Waiting):
        rate(store, "rules", ann, first["step_id"] + 6, {TARGET: {"score": 50, "call": True}})
    shift_back(store, 29)
    assert next_step(store, "rules", ann)["step"]["arm"] == "aided"
    with pytest.raises(StudyError, match="reason"):
        correct(store, "rules", ann, first["step_id"], TARGET, {"score": 60, "call": True}, "")
    assert correct(store, "rules", ann, first["step_id"], TARGET, {"score": 60, "call": True}, "misread the side")["seq"] == 2


@needs_data
def test_a_study_in_the_store_is_analysed(study_store, tmp_path):
    """A sequential study rated in the store: `study analyse NAME --db` gives the OR analysis,
    the calls, the times and the model alone, and the .imrmc/.lrc exports."""
    store, cases, _ = study_store
    create_study(store, "seq", design="sequential", targets=[TARGET], readers=["ann", "bob", "cy"], cases=cases[:20] + cases[-10:],
                 seed=3)
    truth = dict(cases)
    rng = np.random.default_rng(0)
    for name in ("ann", "bob", "cy"):
        reader = store.reader_by_name(name)
        while (step := next_step(store, "seq", reader)["step"]) is not None:
            with store.session("t") as session:
                result_id = session.get(StudyCase, session.get(StudyStep, step["step_id"]).case_id).result_id
            positive = truth[result_id][TARGET]
            score = float(np.clip(50 + (25 if positive else -25) * (1.3 if step["arm"] == "aided" else 1) + rng.normal(0, 20), 0, 100))
            rate(store, "seq", reader, step["step_id"], {TARGET: {"score": score, "call": score > 50}},
                 seconds=20 if step["arm"] == "unaided" else 15)
    out = tmp_path / "analysis"
    done = subprocess.run([*CLI, "study", "analyse", "seq", "--db", store.url, "--out", str(out)], check=False,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "study.json").read_text())
    assert set(result["auc"]) == {"unaided", "aided"} and {"F", "ddf", "p"} <= set(result["rrrc"])
    extra = result["study"]
    assert set(extra["calls"]["aided"]) == {"ann", "bob", "cy"} and extra["reading_time"]["mean_difference"] == -5.0
    assert 0 < extra["model_alone"]["auc"] <= 1
    assert (out / "study.imrmc").exists() and "## 4. The study's other figures" in (out / "study.md").read_text()
    missing = subprocess.run([*CLI, "study", "analyse", "nosuch", "--db", store.url, "--out", str(out)], check=False,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no study 'nosuch'" in missing.stderr and "Traceback" not in missing.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@needs_data
@pytest.mark.slow
def test_a_crossover_study_read_in_the_browser(study_store, tmp_path):
    """Two readers, 40 cases, both arms, in two Chromium browsers: every case in the reader's
    seeded order; in the unaided arm no answer the page receives holds the model's output (its
    network traffic is recorded); the washout stops the second arm until four weeks have passed;
    then the study is analysed and exported."""
    if CHROMIUM is None:
        (pytest.fail if os.environ.get("PNEUMOSCAN_REQUIRE_VALIDATORS") else pytest.skip)("chromium is not installed")
    from playwright.sync_api import sync_playwright
    from test_review_page import LiveServer

    from pneumoscan.apps.server import create_app

    store, cases, predictor = study_store
    keys = {name: store.add_reader(f"{name}-x") for name in ("ann", "bob")}
    create_study(store, "browser", design="crossover", targets=[TARGET], readers=[f"{n}-x" for n in keys], cases=cases, seed=11)
    truth = dict(cases)
    with store.session("t") as session:
        plan = {name: [(s.case_id, s.arm) for s in session.scalars(
            select(StudyStep).where(StudyStep.reader_id == store.reader_by_name(f"{name}-x").id)
            .order_by(StudyStep.position)).all()] for name in keys}
        result_of = {c.id: c.result_id for c in session.scalars(select(StudyCase)).all()}
    seen: dict[str, list] = {name: [] for name in keys}
    leaks: list[str] = []
    answers = {"unaided": 0, "aided with the model": 0}
    failures: list[BaseException] = []

    def read(name: str, url: str, steps: int) -> None:
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1300, "height": 900})

                def check(response) -> None:
                    if "/v1/" not in response.url:
                        return
                    text = response.text().replace('":"', '": "')
                    shows = any(word in text for word in ("probabilit", '"model"', '"heat"', '"lungs"', "threshold"))
                    if '"arm": "unaided"' in text or "/v1/review" in response.url:
                        answers["unaided"] += 1
                        if shows:
                            leaks.append(f"{name}: {response.url}")
                    elif '"arm": "aided"' in text:
                        answers["aided with the model"] += shows
                page.on("response", check)
                page.goto(url + "/study")
                page.fill("#readerkey", keys[name])
                page.click("#signin")
                page.click("#studies button")
                rng = np.random.default_rng(len(name))
                for _ in range(steps):
                    page.wait_for_selector("#targets .target")
                    case = int(page.inner_text("#case").split()[-1])
                    arm = "aided" if "aided:" in page.inner_text("#arm") else "unaided"
                    assert page.locator("#model").is_hidden() == (arm == "unaided")
                    seen[name].append((case, arm))
                    positive = truth[result_of[case]][TARGET]
                    score = int(np.clip(50 + (30 if positive else -30) + rng.normal(0, 25), 0, 100))
                    page.fill(".target input[type=number]", str(score))
                    if score > 50:
                        page.check(".target input[type=checkbox]")
                    before = page.inner_text("#progress")
                    page.keyboard.press("Enter")
                    page.wait_for_function("before => document.getElementById('progress').textContent !== before", arg=before)
                page.wait_for_function("() => /Washout|all your readings/.test(document.getElementById('status').textContent)")
                seen[name].append(page.inner_text("#status"))
                browser.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failures.append(exc)

    def both(steps: int) -> None:
        with LiveServer(create_app(predictor, store=store, allowed_hosts=None)) as url:
            threads = [threading.Thread(target=read, args=(name, url, steps)) for name in keys]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=900)
        if failures:
            raise failures[0]

    both(CASES)
    for name in keys:
        assert seen[name][-1].startswith("Washout: your next readings open on")
    shift_back(store, 28.1)
    both(CASES)
    for name in keys:
        readings = [s for s in seen[name] if isinstance(s, tuple)]
        assert readings == plan[name]  # the seeded order, both arms, nothing skipped or repeated
        assert seen[name][-1].startswith("Study browser: all your readings are in")
    assert {arm for _, arm in plan["ann"][:CASES]} == {"unaided"} and {arm for _, arm in plan["bob"][:CASES]} == {"aided"}
    assert not leaks, leaks
    assert answers == {"unaided": 2 * CASES, "aided with the model": 2 * CASES}  # the check saw every answer
    out = tmp_path / "analysis"
    done = subprocess.run([*CLI, "study", "analyse", "browser", "--db", store.url, "--out", str(out)], check=False,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "study.json").read_text())
    assert set(result["auc"]) == set(ARMS) and result["design"]["cases"] == CASES and len(result["design"]["readers"]) == 2
    assert (out / "study.imrmc").read_text().count("\n") > 4 * CASES and (out / "study.lrc").exists()


@needs_data
def test_study_create_from_a_case_list(study_store, tmp_path, data_dir):
    """`study create`: films predicted and stored, steps for each reader and arm, each target's own
    map stored for the aided arm (two targets here); a case list without its truth column is
    refused in one line."""
    store, _, _ = study_store
    table = pd.read_csv(data_dir / "nih-cxr14" / "Data_Entry_2017.csv")
    images = sorted(p.name for p in (data_dir / "nih-cxr14" / "images").iterdir())[:6]
    found = table.set_index("Image Index").loc[images, "Finding Labels"]
    cases = tmp_path / "cases.csv"
    pd.DataFrame({"path": [str(data_dir / "nih-cxr14" / "images" / n) for n in images],
                  "Pneumonia": [int("No Finding" not in f) for f in found],
                  "Effusion": [int("Effusion" in f) for f in found]}).to_csv(cases, index=False)
    done = subprocess.run([*CLI, "study", "create", "cli", "--cases", str(cases), "--target", "Pneumonia",
                           "--target", "Effusion", "--reader", "ann", "--reader", "bob", "--design", "sequential",
                           "--db", store.url], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "study cli: 6 cases × 2 readers × 2 arms (sequential)" in done.stderr
    step = next_step(store, "cli", store.reader_by_name("bob"))
    assert step["total"] == 12 and step["step"]["arm"] == "unaided"
    cases_of = {item["name"]: item["id"] for item in store.worklist(None, source="study", limit=500)[0]}
    heat = {name: set(store.result_view(cases_of[name], None)["layers"]["heat"]) for name in images}
    assert all({"Pneumonia", "Effusion"} <= maps for maps in heat.values()), heat  # each target's own map
    wrong = subprocess.run([*CLI, "study", "create", "cli2", "--cases", str(cases), "--target", "Edema", "--reader", "ann",
                            "--reader", "bob", "--db", store.url], check=False, capture_output=True, text=True)
    assert wrong.returncode == 2 and "missing columns Edema" in wrong.stderr and "Traceback" not in wrong.stderr
    results = store.counts()["results"]
    again = subprocess.run([*CLI, "study", "create", "cli", "--cases", str(cases), "--target", "Pneumonia", "--reader",
                            "ann", "--db", store.url], check=False, capture_output=True, text=True)
    assert again.returncode == 2 and "exists already" in again.stderr
    doubled = tmp_path / "doubled.csv"
    pd.concat([pd.read_csv(cases)] * 2).to_csv(doubled, index=False)
    twice = subprocess.run([*CLI, "study", "create", "cli3", "--cases", str(doubled), "--target", "Pneumonia",
                            "--reader", "ann", "--db", store.url], check=False, capture_output=True, text=True)
    assert twice.returncode == 2 and "listed twice" in twice.stderr
    assert store.counts()["results"] == results  # refused before anything was predicted or stored
