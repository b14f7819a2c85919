"""Stage 8: AUC, bootstrap CI, Youden thresholds, calibration, the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoscan.labels import LABELS
from pneumoscan.training.metrics import auc_ci, calibration, roc_auc, sens_spec, youden_threshold
from pneumoscan.training.report import write_report
from pneumoscan.training.tables import evaluate_probabilities

from conftest import CLI, DATA, TEST_ASSESSED, needs_data


def test_auc_known_values_and_nan_for_one_class():
    y = np.array([0, 0, 1, 1, np.nan])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8, 0.9])) == pytest.approx(0.75)
    assert np.isnan(roc_auc(np.array([0, 0, np.nan]), np.array([0.1, 0.2, 0.3])))
    assert all(np.isnan(auc_ci(np.array([1.0, 1.0]), np.array([0.2, 0.3]))))


def test_bootstrap_ci_brackets_the_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    p = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    auc = roc_auc(y, p)
    low, high = auc_ci(y, p, n_boot=300)
    assert low < auc < high and high - low < 0.15


def test_youden_threshold_separates_perfectly_separable_scores():
    y = np.array([0, 0, 0, 1, 1, 1], float)
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.7
    assert sens_spec(y, p, t) == (1.0, 1.0)


def test_calibration_error_zero_when_calibrated_large_when_not():
    p = np.repeat([0.25, 0.75], 400)
    y = np.concatenate([np.r_[np.ones(100), np.zeros(300)], np.r_[np.ones(300), np.zeros(100)]])
    ece, bins = calibration(y, p)
    assert ece == pytest.approx(0.0, abs=1e-9) and len(bins) == 2
    assert calibration(y, 1 - p)[0] == pytest.approx(0.5)


def test_report_has_contract_keys_and_survives_classes_without_positives(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.full((50, 15), np.nan, np.float32)
    labels[:, LABELS.index("Pneumonia")] = rng.integers(0, 2, 50)
    labels[:, LABELS.index("Hernia")] = 0  # known, but no positives
    probs = rng.random((50, 15)).astype(np.float32)
    report = evaluate_probabilities(labels, probs, {"Pneumonia": 0.5}, split="val", n_boot=50)
    assert report["auc"]["Hernia"] is None and report["auc"]["Pneumonia"] is not None
    assert report["mean_auc_14"] == report["auc"]["Pneumonia"]  # the one assessed finding
    unassessed = evaluate_probabilities(labels, probs, {}, split="val", n_boot=20)
    assert unassessed["mean_auc_14"] is None  # labels the model does not assess are never averaged
    for label in LABELS:
        assert {"threshold", "sensitivity", "specificity"} <= set(report[label])
    write_report(report, labels, probs, tmp_path)
    back = json.loads((tmp_path / "report.json").read_text())
    assert set(back) >= {"auc", "auc_ci", "mean_auc_14", "n_images"}
    assert (tmp_path / "roc.png").stat().st_size > 10_000 and (tmp_path / "reliability.png").exists()
    assert "CheXNet" in (tmp_path / "report.md").read_text()


def test_source_confounding_is_flagged():
    # positives only in source A; most negatives from source B, which is easy to tell apart
    sources = np.array(["A"] * 10 + ["B"] * 90)
    y = np.r_[np.ones(3), np.zeros(7), np.zeros(90)]
    p = np.r_[np.full(10, 0.9), np.full(90, 0.1)]  # a pure source detector
    labels = np.full((100, 15), np.nan)
    labels[:, 0] = y
    probs = np.tile(p[:, None], (1, 15))
    report = evaluate_probabilities(labels, probs, {}, "val", n_boot=20, sources=sources)
    check = report["per_label"][LABELS[0]]
    assert report["auc"][LABELS[0]] > 0.9  # looks excellent...
    assert check["negatives_from_sources_without_positives"] == pytest.approx(90 / 97, abs=1e-4)
    assert check["auc_within_sources"] == pytest.approx(0.5)  # ...but knows nothing within A
    assert check["sources_with_positives"] == ["A"]


def _source_detector(n_pos_a: int = 20):
    """Source A has positives and negatives, source B only negatives; the scores tell A from B
    perfectly and know nothing inside A: pooled AUC looks excellent, within-source is chance."""
    sources = np.array(["A"] * 40 + ["B"] * 160)
    labels = np.full((200, 15), np.nan, np.float32)
    j = LABELS.index("Infiltration")
    labels[:, j] = np.r_[np.ones(n_pos_a), np.zeros(40 - n_pos_a), np.zeros(160)]
    rng = np.random.default_rng(3)
    probs = np.tile(np.r_[0.8 + 0.1 * rng.random(40), 0.1 * rng.random(160)][:, None], (1, 15)).astype(np.float32)
    return labels, probs, sources, j


def test_headline_uses_only_within_source_auc_and_says_so(tmp_path):
    labels, probs, sources, j = _source_detector()
    report = evaluate_probabilities(labels, probs, {"Infiltration": 0.5}, "test", n_boot=50, sources=sources)
    assert report["auc"]["Infiltration"] > 0.9  # the pooled figure, kept in the detail table
    assert report["mean_auc_14"] == pytest.approx(report["within_source"]["per_label"]["Infiltration"]["auc"])
    assert report["mean_auc_14"] < 0.75 and report["mean_auc_14_labels"] == ["Infiltration"]
    write_report(report, labels, probs, tmp_path)
    text = (tmp_path / "report.md").read_text()
    headline = text.split("## Detail")[0]
    assert f"**{report['mean_auc_14']:.3f}**" in headline and "1 assessed finding (Infiltration" in headline
    assert f"{report['auc']['Infiltration']:.3f}" not in headline  # pooled AUC only below
    assert f"| this model | {report['mean_auc_14']:.3f} | within-source mean over 1 assessed finding," in text


def test_headline_left_out_when_no_source_has_both_classes(tmp_path):
    labels, probs, sources, _ = _source_detector(n_pos_a=3)  # 3 positives: too few inside A
    report = evaluate_probabilities(labels, probs, {}, "test", n_boot=20, sources=sources)
    assert report["mean_auc_14"] is None and report["mean_auc_14_labels"] == []
    write_report(report, labels, probs, tmp_path)
    assert "no mean AUC is reported" in (tmp_path / "report.md").read_text()


def test_assess_labels_needs_adult_positives_a_large_source_and_a_ci_above_0_65():
    from pneumoscan.training.tables import assess_labels

    rng = np.random.default_rng(0)
    j, k = LABELS.index("Pneumonia"), LABELS.index("Nodule")
    n = 1200  # the adult source's validation films: at least 1,000 are required
    val_sources = np.array(["nih"] * n + ["kermany"] * 80)
    val = np.full((n + 80, 15), np.nan, np.float32)
    val[:, j] = np.r_[np.ones(100), np.zeros(n - 100), np.ones(40), np.zeros(40)]
    val[:n, k] = np.r_[np.ones(60), np.zeros(n - 60)]
    probs = rng.random((n + 80, 15)).astype(np.float32) * 0.5
    probs[:100, j] += 0.5  # learnt inside nih
    probs[:60, k] += 0.08  # Nodule: barely better than chance (AUC about 0.66, CI reaching below 0.65)
    train_sources = np.array(["nih"] * 150 + ["kermany"] * 3000)
    train = np.full((3150, 15), np.nan, np.float32)
    train[:, j] = np.r_[np.ones(120), np.zeros(30), np.ones(3000)]
    train[:150, k] = np.r_[np.ones(120), np.zeros(30)]
    out = assess_labels(val, probs, val_sources, train, train_sources, n_boot=200)
    assert out["Pneumonia"]["assessed"] and 0 < out["Pneumonia"]["threshold"] < 1
    assert out["Pneumonia"]["adult_train_positives"] == 120  # Kermany children do not count
    assert not out["Nodule"]["assessed"] and out["Nodule"]["threshold"] is None
    assert "below 0.65" in out["Nodule"]["reason"]
    assert not out["Hernia"]["assessed"] and "adult training positives" in out["Hernia"]["reason"]
    small = assess_labels(val[n - 200:], probs[n - 200:], val_sources[n - 200:], train, train_sources, n_boot=50)
    assert not small["Pneumonia"]["assessed"] and "1000 films" in small["Pneumonia"]["reason"]
    few = assess_labels(val, probs, val_sources, train[150:], train_sources[150:], n_boot=50)
    assert not few["Pneumonia"]["assessed"]  # only paediatric training positives


def test_assessment_must_hold_on_the_films_the_model_will_read_and_thresholds_reach_a_specificity():
    """A label learnt inside the large lung-masked source but at chance on the unmasked originals
    (confirm_in) is not assessed, and the reason names those films; a label good in both is, with
    its threshold at the lowest cut giving specificity 0.9 on the originals."""
    from pneumoscan.training.metrics import sens_spec
    from pneumoscan.training.tables import assess_labels

    rng = np.random.default_rng(1)
    j, k = LABELS.index("Effusion"), LABELS.index("Mass")
    n, m = 1500, 300
    sources = np.array(["nihmasked"] * n + ["nih"] * m)
    labels = np.full((n + m, 15), np.nan, np.float32)
    labels[:, j] = labels[:, k] = (np.arange(n + m) % 5 == 0).astype(np.float32)
    probs = rng.random((n + m, 15)).astype(np.float32) * 0.5
    probs[:, j] += 0.5 * labels[:, j]  # learnt in both sources
    probs[:n, k] += 0.5 * labels[:n, k]  # learnt in the masked copies only
    out = assess_labels(labels, probs, sources, labels, sources, n_boot=100, method="specificity", target=0.9,
                        confirm_in="nih")
    assert out["Effusion"]["assessed"] and set(out["Effusion"]["validation"]) == {"nihmasked", "nih"}
    inside = sources == "nih"  # the threshold is set on the films it will read
    assert out["Effusion"]["threshold_chosen_in"] == "nih"
    assert sens_spec(labels[inside, j], probs[inside, j], out["Effusion"]["threshold"])[1] >= 0.9
    assert not out["Mass"]["assessed"] and "in nih" in out["Mass"]["reason"]
    assert out["Mass"]["validation"]["nihmasked"]["ci"][0] > 0.65  # the large source alone would have passed


@needs_data
def test_calibrate_warns_when_a_target_gives_up_the_other_side():
    from pneumoscan.training.calibrate import weak_operating_points

    result = {"labels": {"Pneumonia": {"changed": True, "new": 0.1, "sensitivity": 0.9, "specificity": 0.18},
                         "Edema": {"changed": True, "new": 0.5, "sensitivity": 0.7, "specificity": 0.8},
                         "Effusion": {"changed": False, "old": 0.3, "new": 0.3, "why": "kept"}}}
    (line,) = weak_operating_points(result)
    assert line.startswith("warning: Pneumonia") and "specificity 0.18" in line


def test_calibrate_moves_thresholds_to_a_target_and_names_itself(tmp_path, small_manifest):
    """A site moves No Finding to sensitivity 0.9 on its validation films: same weights, new
    threshold reaching the target there, a new hash, and every output names the calibration."""
    import subprocess

    import pandas as pd

    from pneumoscan.classify import Classifier, load_default
    from pneumoscan.training.evaluate import score_split
    from pneumoscan.training.metrics import operating_threshold

    table = pd.read_csv(small_manifest)
    table = table[table.source != "kermany"]  # adult films; 30 No Finding and 30 others as the site's set
    site = pd.concat([table[table["No Finding"] == 1].head(30), table[table["No Finding"] == 0].head(30)])
    table.loc[site.index, "split"] = "site"
    manifest = tmp_path / "site.csv"
    table.to_csv(manifest, index=False)
    small_manifest = manifest
    new = tmp_path / "site.pt"
    run = subprocess.run([*CLI, "calibrate", "--manifest", str(small_manifest), "--split", "site", "--out", str(new),
                          "--target-sensitivity", "0.9", "--n-boot", "50"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    parent, child = load_default(), Classifier.load(new)
    assert child.meta["weights_sha256"] == parent.meta["weights_sha256"]
    assert child.meta["sha256"] != parent.meta["sha256"] and child.assessed_labels == parent.assessed_labels
    source = child.meta["threshold_provenance"]
    assert source["method"] == "sensitivity" and source["target"] == 0.9 and source["parent_model_sha256"] == parent.meta["sha256"]
    scored = score_split(small_manifest, "site", model=new)
    j = LABELS.index("No Finding")
    y, p = scored.labels[:, j], scored.probs[:, j]
    known = ~np.isnan(y)
    threshold = child.meta["thresholds"]["No Finding"]
    assert threshold == pytest.approx(operating_threshold(y, p, "sensitivity", 0.9), abs=1e-6)
    assert (p[known & (y == 1)] >= threshold).mean() >= 0.9
    assert "calibrated (sensitivity 0.9)" in child.thresholds_from and (tmp_path / "site.md").exists()
    predicted = subprocess.run([*CLI, "predict", str(DATA / "nih-cxr14/images/00000100_000.png"), "--out",
                                str(tmp_path / "p"), "--model", str(new), "--no-overlays"],
                               capture_output=True, text=True, timeout=300)
    record = json.loads((tmp_path / "p" / "predictions.jsonl").read_text())
    assert predicted.returncode == 0 and record["thresholds_from"].startswith("calibrated")
    shown = child.readings[record["population"]["group"]].shown_thresholds()  # on the calibrated scale
    assert record["thresholds"]["No Finding"] == pytest.approx(shown["No Finding"], abs=1e-6)
    # the site's prevalence: the adult maps shifted to it, and the records name the site
    shifted = tmp_path / "site-prev.pt"
    run = subprocess.run([*CLI, "calibrate", "--manifest", str(small_manifest), "--split", "site", "--out", str(shifted),
                          "--youden", "--n-boot", "20", "--prevalence", "No Finding=0.3"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    moved = Classifier.load(shifted)
    spec = moved.meta["reading"]["populations"]["adult"]["calibration"]["No Finding"]
    assert spec["prevalence"] == 0.3 and spec["shift"] != 0 and "site.csv split site" in moved.readings["adult"].calibrated_for
    raw = np.array([0.5] * 15)
    assert moved.readings["adult"].calibrate(raw[None])[0][j] < child.readings["adult"].calibrate(raw[None])[0][j]
    bad_share = subprocess.run([*CLI, "calibrate", "--manifest", str(small_manifest), "--split", "site", "--out",
                                str(tmp_path / "y.pt"), "--youden", "--prevalence", "No Finding=1.5"],
                               capture_output=True, text=True, timeout=120)
    assert bad_share.returncode == 2 and "strictly between 0 and 1" in bad_share.stderr
    for bad in (["--split", "test", "--youden"], ["--split", "site", "--youden", "--target-specificity", "0.9"]):
        refused = subprocess.run([*CLI, "calibrate", "--manifest", str(small_manifest), "--out",
                                  str(tmp_path / "x.pt"), *bad], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (tmp_path / "z.md").write_text("the site's own notes")  # the card calibrate would write beside z.pt
    kept = subprocess.run([*CLI, "calibrate", "--manifest", str(small_manifest), "--split", "site", "--out",
                           str(tmp_path / "z.pt"), "--youden"], capture_output=True, text=True, check=False, timeout=300)
    assert kept.returncode == 2 and "z.md exists" in kept.stderr and "Traceback" not in kept.stderr
    assert (tmp_path / "z.md").read_text() == "the site's own notes" and not (tmp_path / "z.pt").exists()


def test_operating_thresholds_reach_their_targets():
    from pneumoscan.training.calibrate import achieved
    from pneumoscan.training.metrics import operating_threshold

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(300)]
    p = np.r_[rng.normal(0.7, 0.15, 200), rng.normal(0.4, 0.15, 300)]
    high_sens = operating_threshold(y, p, "sensitivity", 0.95)
    edge = np.sort(p[y == 1])[::-1][189]  # the 190th of 200 positives makes 0.95
    assert (p[y == 1] >= high_sens).mean() >= 0.95 and high_sens < edge and not ((p > high_sens) & (p < edge)).any()
    high_spec = operating_threshold(y, p, "specificity", 0.9)
    edge = np.sort(p[y == 0])[269]  # the 270th of 300 negatives makes 0.90
    assert (p[y == 0] < high_spec).mean() >= 0.9 and high_spec > edge and not ((p < high_spec) & (p > edge)).any()
    rates = achieved(y, p, high_sens, n_boot=200)
    assert rates["sensitivity"] >= 0.95 and rates["sensitivity_ci"][0] <= rates["sensitivity"] <= rates["sensitivity_ci"][1]
    with pytest.raises(ValueError, match="between 0 and 1"):
        operating_threshold(y, p, "sensitivity", 1.5)


def test_subgroups_add_up_and_count_underdiagnosis():
    from pneumoscan.training.tables import operating_points, subgroups

    rng = np.random.default_rng(3)
    n = 400
    labels = np.full((n, 15), np.nan, np.float32)
    nf, pn = LABELS.index("No Finding"), LABELS.index("Pneumonia")
    labels[:, pn] = rng.integers(0, 2, n)
    labels[:, nf] = 1 - labels[:, pn]
    probs = rng.random((n, 15)).astype(np.float32)
    groups = {"sex": rng.choice(["M", "F", "unknown"], n), "age": rng.choice(["18-39", "60-79"], n),
              "view": rng.choice(["PA", "AP"], n), "source": rng.choice(["nih", "rsna"], n)}
    thresholds = {"Pneumonia": 0.5, "No Finding": 0.4}
    cells = subgroups(labels, probs, thresholds, groups, n_boot=20)
    for label in thresholds:
        for source in ("nih", "rsna"):
            for attribute in ("sex", "age", "view"):
                mine = [c for c in cells if (c["label"], c["source"], c["attribute"]) == (label, source, attribute)]
                assert sum(c["films"] for c in mine) == int((groups["source"] == source).sum())
                assert sum(c["positives"] for c in mine) == int(((groups["source"] == source) &
                                                                 (labels[:, LABELS.index(label)] == 1)).sum())
    cell = next(c for c in cells if (c["source"], c["attribute"], c["value"]) == ("nih", "sex", "F"))
    sick = (groups["source"] == "nih") & (groups["sex"] == "F") & (labels[:, nf] == 0)
    assert cell["films_with_a_finding"] == int(sick.sum())
    assert cell["underdiagnosed"] == pytest.approx((probs[sick, nf] >= 0.4).mean(), abs=1e-4)
    table = operating_points(labels, probs, thresholds)
    assert [r["target"] for r in table["Pneumonia"]][:2] == ["sensitivity 0.80", "sensitivity 0.90"]
    assert all(r["sensitivity"] >= 0.9 for r in table["Pneumonia"] if r["target"] == "sensitivity 0.90")


@needs_data
def test_evaluate_writes_subgroups_scores_operating_points_and_html(small_manifest, assessed_model, tmp_path):
    import subprocess

    import pandas as pd

    run = subprocess.run([*CLI, "evaluate", "--manifest", str(small_manifest), "--split", "test", "--out",
                          str(tmp_path / "e"), "--model", str(assessed_model), "--n-boot", "50"],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.splitlines()[0] == "evaluate: loading models …"
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    scores = pd.read_csv(tmp_path / "e" / "scores.csv")
    assert len(scores) == report["n_images"] and {"p_Pneumonia", "y_Pneumonia", "sex", "age"} <= set(scores)
    assert {c["label"] for c in report["subgroups"]} == set(TEST_ASSESSED)  # every assessed label, no other
    for label in TEST_ASSESSED:
        for source in scores.source.unique():
            known = int(scores.loc[scores.source == source, f"y_{label}"].notna().sum())
            for attribute in ("sex", "age", "view"):
                cells = [c for c in report["subgroups"] if (c["label"], c["source"], c["attribute"]) ==
                         (label, source, attribute)]
                assert sum(c["films"] for c in cells) == known
    text = (tmp_path / "e" / "report.md").read_text()
    assert "## Subgroups (inside each source)" in text
    patients = pd.read_csv(small_manifest).query("split == 'test'")["patient"].nunique()
    assert report["ci_resamples"] == {"unit": "patients", "count": patients, "draws": 50}  # every film scored here
    assert f"50 resamples of the split's {patients:,} patients" in text
    page = (tmp_path / "e" / "report.html").read_text()
    assert page.count("<table>") == text.count("\n|---") and 'src="roc.png"' in page


def test_a_film_listed_twice_counts_once_and_scores_csv_keeps_names_as_text(tmp_path):
    """Issue 36: duplicate manifest rows (the same file) are counted once; scores.csv applies the
    formula rule to its text cells, as predictions.csv does."""
    import csv

    import pandas as pd

    from pneumoscan.data.manifest import unique_films
    from pneumoscan.training.report import write_scores

    table = pd.DataFrame({"path": ["a.png", "=HYPERLINK(1).png", "a.png", "b.png"], "source": ["s"] * 4,
                          "patient": ["1", "2", "1", "3"], "split": ["test"] * 4})
    kept, repeated = unique_films(table)
    assert repeated == 1 and kept["path"].tolist() == ["a.png", "=HYPERLINK(1).png", "b.png"]
    write_scores(kept, np.zeros((3, len(LABELS))), np.full((3, len(LABELS)), 0.5), tmp_path / "scores.csv")
    with open(tmp_path / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == ["a.png", "'=HYPERLINK(1).png", "b.png"]


@pytest.mark.parametrize("n,prevalence,decimals", [(9, 0.3, 1), (300, 0.05, 2), (1281, 0.1, 3)])
def test_bootstrap_aucs_are_scikit_learns_on_the_same_resamples(n, prevalence, decimals):
    """The vectorised bootstrap (weights per image, ties counting one half) gives, draw for draw,
    what ``roc_auc_score`` gives on ``rng.integers(0, n, n)`` resamples, draws with one class left
    out; so every CI and paired difference in the reports is unchanged by it."""
    from sklearn.metrics import roc_auc_score

    from pneumoscan.training.metrics import auc_ci, bootstrap_aucs

    rng = np.random.default_rng(n)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]
    a = np.round(rng.random(n) * 0.7 + 0.3 * y, decimals)  # rounded: many ties
    b = np.round(rng.random(n), decimals)
    draws, expected = np.random.default_rng(0), []
    for _ in range(300):
        idx = draws.integers(0, n, n)
        if y[idx].min() != y[idx].max():
            expected.append([roc_auc_score(y[idx], a[idx]), roc_auc_score(y[idx], b[idx])])
    got = bootstrap_aucs(y, [a, b], 300)
    assert got.shape == (len(expected), 2) and np.abs(got - np.array(expected)).max() < 1e-12
    low, high = auc_ci(y.astype(float), a, 300)
    assert np.allclose((low, high), np.percentile(np.array(expected)[:, 0], [2.5, 97.5]), rtol=0, atol=1e-12)


def test_a_patient_bootstrap_draws_patients_and_widens_the_interval_when_their_films_agree():
    """``groups``: each draw takes patients with replacement and every film of a drawn patient
    (scikit-learn's AUC of exactly those films, draw for draw); one patient per film is the image
    bootstrap itself; and when a patient's films are copies of one another, the interval over
    patients is as wide as that of one film per patient, not the too-narrow one over films."""
    from sklearn.metrics import roc_auc_score

    from pneumoscan.training.metrics import auc_ci, auc_difference, bootstrap_aucs

    rng = np.random.default_rng(3)
    patients = np.array([f"p{k}" for k in rng.integers(0, 60, 200)])
    y = (rng.random(200) < 0.3).astype(int)
    y[:2] = [0, 1]
    a, b = np.round(rng.random(200) * 0.6 + 0.4 * y, 2), rng.random(200)
    names = np.unique(patients)
    draws, expected = np.random.default_rng(0), []
    for _ in range(200):
        films = np.concatenate([np.flatnonzero(patients == names[k]) for k in draws.integers(0, len(names), len(names))])
        if y[films].min() != y[films].max():
            expected.append([roc_auc_score(y[films], a[films]), roc_auc_score(y[films], b[films])])
    got = bootstrap_aucs(y, [a, b], 200, groups=patients)
    assert got.shape == (len(expected), 2) and np.abs(got - np.array(expected)).max() < 1e-12
    assert np.array_equal(bootstrap_aucs(y, [a], 50, groups=np.arange(200)), bootstrap_aucs(y, [a], 50))

    one = (rng.random(80) < 0.4).astype(float)
    one[:2] = [0, 1]
    score = rng.random(80) * 0.5 + 0.3 * one
    copies = 6  # every patient's film six times
    y6, p6, g6 = np.repeat(one, copies), np.repeat(score, copies), np.repeat(np.arange(80), copies)
    per_patient = np.diff(auc_ci(one, score, 1000))[0]
    per_film = np.diff(auc_ci(y6, p6, 1000))[0]
    grouped = np.diff(auc_ci(y6, p6, 1000, groups=g6))[0]
    assert per_film < 0.6 * per_patient and 0.8 < grouped / per_patient < 1.25
    y6[0] = np.nan  # an unknown label leaves its film, and its film alone, out of the groups too
    diff = auc_difference(y6, p6, np.repeat(rng.random(80), copies), 500, groups=g6)
    assert diff["low"] < diff["difference"] < diff["high"]


def test_report_intervals_resample_patients_when_the_films_of_one_patient_repeat():
    """evaluate / crossval / train reports: with ``patients`` every CI (pooled, per source,
    subgroup) is the patient bootstrap's, and says so; the AUCs themselves do not change. Six
    copies of each patient's film: the film-wise interval is too narrow, the patient-wise one
    is that of one film per patient."""
    import pandas as pd

    from pneumoscan.training.tables import patient_keys, subgroups

    rng = np.random.default_rng(5)
    y1 = (rng.random(80) < 0.4).astype(float)
    y1[:2] = [0, 1]
    p1 = rng.random(80) * 0.5 + 0.3 * y1
    labels, probs = np.full((480, len(LABELS)), np.nan), np.full((480, len(LABELS)), 0.5)
    j = LABELS.index("Pneumonia")
    labels[:, j], probs[:, j] = np.repeat(y1, 6), np.repeat(p1, 6)
    rows = pd.DataFrame({"path": [f"f{k}.png" for k in range(480)], "patient": np.repeat([f"nih:{k}" for k in range(80)], 6),
                         "source": "nih", "sex": "M", "age": 50.0, "view": "PA"})
    patients = patient_keys(rows)
    films = evaluate_probabilities(labels, probs, {"Pneumonia": 0.5}, "test", n_boot=400, sources=rows["source"].to_numpy())
    grouped = evaluate_probabilities(labels, probs, {"Pneumonia": 0.5}, "test", n_boot=400,
                                     sources=rows["source"].to_numpy(), patients=patients)
    assert films["ci_resamples"] == {"unit": "images", "count": 480, "draws": 400}
    assert grouped["ci_resamples"] == {"unit": "patients", "count": 80, "draws": 400}
    assert grouped["auc"]["Pneumonia"] == films["auc"]["Pneumonia"]
    assert tuple(grouped["auc_ci"]["Pneumonia"]) == pytest.approx(auc_ci(labels[:, j], probs[:, j], 400, groups=patients), abs=1e-4)
    width = {name: np.diff(r["within_source"]["per_label"]["Pneumonia"]["sources"]["nih"]["ci"])[0]
             for name, r in (("films", films), ("patients", grouped))}
    one_each = np.diff(auc_ci(y1, p1, 400))[0]
    assert width["films"] < 0.6 * one_each and 0.8 < width["patients"] / one_each < 1.25
    cells = subgroups(labels, probs, {"Pneumonia": 0.5}, {"sex": rows["sex"].to_numpy(), "age": np.array(["adult"] * 480),
                                                         "view": rows["view"].to_numpy(), "source": rows["source"].to_numpy(),
                                                         "patient": patients}, n_boot=400)
    assert all(tuple(c["auc_ci"]) == pytest.approx(grouped["auc_ci"]["Pneumonia"], abs=1e-4) for c in cells)
    # a film without a patient key is a patient of its own
    rows.loc[0, "patient"] = None
    keys = patient_keys(rows)
    assert keys[0] == "film:f0.png" and keys[1] == "nih:0"
