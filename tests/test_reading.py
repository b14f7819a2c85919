"""One film, one answer: the verdict rule, calibration maps, populations (pneumoscan.reading) and
their fitting (pneumoscan.training.reading_fit)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.labels import LABELS
from pneumoscan.reading import (
    NIH_ADULT_PREVALENCE,
    VERDICTS,
    Reading,
    apply_map,
    estimate_population,
    expit,
    logit,
    one_verdict,
    population_from_age,
    prior_shift,
    rank_knots,
    rank_scores,
    readings,
    status_of,
    verdict_of,
    verdict_reason,
)
from pneumoscan.training.reading_fit import (
    calibration_figures,
    choose_calibration,
    fit_map,
    prevalence_weights,
)


def test_no_finding_is_never_listed_beside_a_finding():
    assert one_verdict(["Effusion", "No Finding"]) == ["Effusion"]
    assert one_verdict(["No Finding"]) == ["No Finding"]
    assert one_verdict([]) == []
    assert verdict_of(["Effusion"], True) == "abnormal"
    assert verdict_of(["No Finding"], True) == "normal"
    assert verdict_of([], True) == "indeterminate"
    assert verdict_of([], True, normal_possible=False) == "no finding called"
    assert verdict_of(None, False) is None


def test_status_follows_the_record():
    assert status_of({"error": "unreadable"}) == "error"
    assert status_of({"probabilities": None}) == "refused"
    assert status_of({"probabilities": {}, "findings": ["No Finding"]}) == "not called"
    assert status_of({"probabilities": {}, "findings": ["Cardiomegaly"]}) == "called"


@pytest.mark.parametrize(("age", "group"), [(7.0, "paediatric"), (45.0, "adult"), (17.9, "paediatric"), (18.0, "adult")])
def test_a_stated_age_decides_the_group(age, group):
    population = population_from_age(age, "PatientAge")
    assert population.group == group and population.source == "PatientAge"
    assert "DICOM PatientAge" in population.reason


def test_platt_map_with_a_prior_shift_is_monotone_and_moves_the_odds():
    p = np.linspace(0.01, 0.99, 50)
    spec = {"method": "platt", "a": 0.8, "b": -0.3, "shift": prior_shift(0.35, 0.0124)}
    out = apply_map(p, spec)
    assert np.all(np.diff(out) > 0)
    np.testing.assert_allclose(logit(out), 0.8 * logit(p) - 0.3 + logit(0.0124) - logit(0.35), atol=1e-9)
    iso = apply_map(p, {"method": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.1, 0.2, 0.9]})
    assert np.all(np.diff(iso) >= 0) and iso[0] == pytest.approx(0.1 + 0.1 * 0.01 / 0.5, rel=1e-3)
    with pytest.raises(ValueError, match="unknown calibration"):
        apply_map(p, {"method": "beta"})


def test_prevalence_weights_put_the_target_share_on_the_positives():
    y = np.r_[np.ones(30), np.zeros(70)]
    w = prevalence_weights(y, 0.02)
    assert w[y == 1].sum() / w.sum() == pytest.approx(0.02)
    assert np.all(prevalence_weights(y, None) == 1)


def test_calibration_fitted_on_an_enriched_sample_answers_for_the_target_population():
    """Scores that are well ranked but far too high at 2 % prevalence: the chosen map brings the
    ECE at the target prevalence down, judged out of fold, and the evidence says so."""
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.3).astype(float)
    raw = expit(1.5 * y - 0.5 + rng.normal(0, 1.0, len(y)) + 1.0)  # over-confident, enriched
    folds = rng.integers(0, 5, len(y))
    spec, evidence = choose_calibration(raw, y, folds, 0.02)
    assert evidence["chosen"] in ("platt", "isotonic") and spec["method"] == evidence["chosen"]
    assert evidence["uncalibrated"]["ece"] > 0.2
    assert evidence[evidence["chosen"]]["ece"] < 0.03
    assert evidence[evidence["chosen"]]["log_loss"] < evidence["uncalibrated"]["log_loss"]
    # the map, applied, gives the target prevalence's mean probability (weighted)
    calibrated = apply_map(raw, spec)
    w = prevalence_weights(y, 0.02)
    assert np.average(calibrated, weights=w) == pytest.approx(0.02, abs=0.005)
    assert calibration_figures(calibrated, y, 0.02)["ece"] < 0.03
    assert fit_map(raw, y, w, "isotonic")["method"] == "isotonic"


def _reading_meta() -> dict:
    adult = {label: {"assessed": label in ("Cardiomegaly", "Pneumonia", "No Finding"),
                     "threshold": {"Cardiomegaly": 0.6, "Pneumonia": 0.5, "No Finding": 0.7}.get(label)}
             for label in LABELS}
    paediatric = {label: {"assessed": label in ("Pneumonia", "No Finding"),
                          "threshold": {"Pneumonia": 0.4, "No Finding": 0.6}.get(label)} for label in LABELS}
    return {"assessment": adult, "reading": {"populations": {
        "adult": {"calibrated_for": "adults at NIH prevalence",
                  "calibration": {"Pneumonia": {"method": "platt", "a": 1.0, "b": -2.0}}},
        "paediatric": {"calibrated_for": "children", "assessment": paediatric, "calibration": {}}}}}


def test_each_population_has_its_own_labels_thresholds_and_calibration():
    meta = _reading_meta()
    assessed = np.array([meta["assessment"][l]["assessed"] for l in LABELS])
    thresholds = np.array([meta["assessment"][l]["threshold"] if a else np.nan for l, a in zip(LABELS, assessed)])
    groups = readings(meta, assessed, thresholds)
    raw = np.full(15, 0.9)
    assert groups["adult"].called(raw) == ["Cardiomegaly", "No Finding", "Pneumonia"]
    assert groups["paediatric"].called(raw) == ["No Finding", "Pneumonia"]  # never an adult-only finding
    # an unknown age is read with the adult reading: an adult never loses the adult findings
    assert groups["unknown"].called(raw) == ["Cardiomegaly", "No Finding", "Pneumonia"]
    shown = groups["adult"].shown_thresholds()
    assert shown["Pneumonia"] == pytest.approx(float(expit(logit(0.5) - 2.0)), abs=1e-6)
    assert shown["Nodule"] is None and shown["Cardiomegaly"] == pytest.approx(0.6)
    assert groups["paediatric"].calibrated_for == "children"
    assert "age is not known" in groups["unknown"].calibrated_for
    old = readings({"assessment": meta["assessment"]}, assessed, thresholds)  # no reading section
    assert old["paediatric"].calibrated_for is None and old["paediatric"].called(raw) == groups["adult"].called(raw)


def test_the_age_model_reads_a_film_as_a_child_an_adult_or_unknown():
    model = {"age": {"w": [10.0, 0.0], "b": 0.0},
             "paediatric": {"w": [0.0, 4.0], "b": -2.0, "paediatric_at": 0.8, "adult_below": 0.3}}
    child = estimate_population(np.array([0.4, 1.5]), model)
    adult = estimate_population(np.array([5.0, 0.0]), model)
    unsure = estimate_population(np.array([2.0, 0.5]), model)
    assert (child.group, adult.group, unsure.group) == ("paediatric", "adult", "unknown")
    assert child.age == pytest.approx(4.0) and child.source == "estimate" and "4 y" in child.reason
    assert adult.to_dict()["paediatric_probability"] < 0.3
    none = estimate_population(np.zeros(2), None)
    assert none.group == "unknown" and "no age estimate" in none.reason


def test_reading_calibrates_only_its_own_maps():
    r = Reading("adult", np.ones(15, bool), np.full(15, 0.5), {"Edema": {"method": "platt", "a": 1.0, "b": 1.0}}, "x")
    out = r.calibrate(np.full((2, 15), 0.5))
    assert out[0, LABELS.index("Edema")] == pytest.approx(float(expit(1.0)))
    assert out[0, LABELS.index("Mass")] == pytest.approx(0.5)
    assert NIH_ADULT_PREVALENCE["Pneumonia"] == pytest.approx(0.01236)


# --- through the predictor, with the shipped models -------------------------------------------

from conftest import DATA, needs_data  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    from pneumoscan.predict import Predictor

    return Predictor.from_paths(backend="torch")


def _with_age(siim_dicom, tmp_path, age: str):
    import pydicom

    ds = pydicom.dcmread(siim_dicom)
    ds.PatientAge = age
    path = tmp_path / f"age{age}.dcm"
    ds.save_as(path)
    return path


@needs_data
def test_dicom_patient_age_decides_how_the_film_is_read(shipped, siim_dicom, tmp_path):
    """PatientAge 007Y: read as a child's film (only the paediatric reading's labels, no adult-only
    finding, no adult CTR cut-off); 045Y: an adult's."""
    classifier = shipped.classifier
    child = shipped.predict(_with_age(siim_dicom, tmp_path, "007Y"))
    adult = shipped.predict(_with_age(siim_dicom, tmp_path, "045Y"))
    assert child.population.to_dict() == {"group": "paediatric", "age": 7.0, "source": "PatientAge",
                                          "reason": "DICOM PatientAge 7 y"}
    assert adult.population.group == "adult" and adult.population.age == 45.0
    for result, group in ((child, "paediatric"), (adult, "adult")):
        reading = classifier.readings[group]
        allowed = {label for label, a in zip(LABELS, reading.assessed) if a}
        assert {k for k, v in result.probabilities.items() if v is not None} == allowed
        assert set(result.findings) <= allowed and result.calibrated_for == reading.calibrated_for
        assert result.to_dict()["verdict"] in VERDICTS
        assert result.to_dict()["status"] in ("called", "not called")
    adult_only = {l for l, a, c in zip(LABELS, classifier.readings["adult"].assessed,
                                       classifier.readings["paediatric"].assessed) if a and not c}
    assert adult_only and not adult_only & {k for k, v in child.probabilities.items() if v is not None}
    if child.measurements and child.measurements.ratio.value is not None:
        assert child.measurements.to_dict()["ctr_above_pa_cutoff"] is None and "child" in child.measurements.cutoff_note


@needs_data
def test_the_shipped_model_is_calibrated_and_estimates_the_population(shipped, nih_png):
    """Without an age in the header the film's population is estimated; its probabilities name
    the population they are calibrated for; the calibrated thresholds keep the raw calls."""
    result = shipped.predict(nih_png)
    assert result.population.source == "estimate" and result.population.group in ("adult", "paediatric", "unknown")
    assert result.population.age is not None and "estimated" in result.population.reason
    assert result.calibrated_for and "NIH" in shipped.classifier.readings["adult"].calibrated_for
    for label, p in result.probabilities.items():
        if p is None:
            continue
        if result.thresholds[label] is None:  # No Finding where the population is never called normal
            assert label == "No Finding" and label not in result.findings and result.verdict != "normal"
            continue
        called = p >= result.thresholds[label]
        if label == "No Finding":
            assert (label in result.findings) == (called and result.verdict != "abnormal")
        else:
            assert called == (label in result.findings)


@needs_data
def test_no_finding_above_its_threshold_beside_a_finding_is_not_listed(tmp_path, nih_png):
    """A model whose thresholds call both Pneumonia and No Finding on a film: the record lists
    Pneumonia alone and the verdict is abnormal."""
    from pneumoscan.classify import load_default
    from pneumoscan.predict import Predictor

    classifier = load_default()
    classifier.set_assessment({label: {"assessed": label in ("Pneumonia", "No Finding"),
                                       "threshold": 0.0 if label in ("Pneumonia", "No Finding") else None}
                               for label in LABELS})
    classifier.meta.pop("reading", None)  # the plain assessment for every population
    classifier.save(tmp_path / "both.pt")
    predictor = Predictor.from_paths(cls_model=tmp_path / "both.pt", backend="torch")
    result = predictor.predict(nih_png)
    assert result.probabilities["No Finding"] >= result.thresholds["No Finding"]
    assert result.findings == ["Pneumonia"] and result.verdict == "abnormal"
    record = result.to_dict()
    assert record["status"] == "called" and record["verdict"] == "abnormal" and record["calibrated_for"] is None
    assert DATA.exists()


def test_a_population_without_a_trustworthy_normal_is_never_called_normal():
    """The normal rule sets the No Finding threshold that calls a film normal; a rule with no
    threshold (no operating point reached the file's NPV) means the verdict says "no finding
    called" and why, never "normal"."""
    meta = _reading_meta()
    meta["reading"]["populations"]["adult"]["normal"] = {
        "threshold": None, "npv_target": 0.9, "population": "adults at NIH prevalence",
        "reason": "no operating point of No Finding reaches NPV 0.90 for adults out of fold (best 0.83)"}
    meta["reading"]["populations"]["paediatric"]["normal"] = {
        "threshold": 0.8, "npv": 0.93, "npv_target": 0.9, "population": "children like Kermany's"}
    assessed = np.array([meta["assessment"][l]["assessed"] for l in LABELS])
    thresholds = np.array([meta["assessment"][l]["threshold"] if a else np.nan for l, a in zip(LABELS, assessed)])
    groups = readings(meta, assessed, thresholds)
    raw = np.full(15, 0.1)
    raw[LABELS.index("No Finding")] = 0.99
    adult, child = groups["adult"], groups["paediatric"]
    assert adult.called(raw) == [] and not adult.normal_possible
    assert adult.shown_thresholds()["No Finding"] is None
    assert verdict_of(adult.called(raw), True, adult.normal_possible) == "no finding called"
    assert "best 0.83" in verdict_reason("no finding called", adult)
    assert groups["unknown"].normal_possible is False  # read with the adult reading
    assert child.called(raw) == ["No Finding"] and child.normal_possible
    raw[LABELS.index("No Finding")] = 0.7  # above the assessment's 0.6, below the normal rule's 0.8
    assert child.called(raw) == []
    assert verdict_of(child.called(raw), True, child.normal_possible) == "indeterminate"


def test_rank_scores_put_every_population_on_one_scale_that_keeps_the_raw_order():
    """The rank score is the raw score's percentile among the development films, the same
    function whatever the population: AUC on it equals the raw AUC on a mixed batch, where the
    populations' calibrated probabilities do not."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    reference = expit(rng.normal(0, 2, 5000))
    spec = {"knots": {"Pneumonia": rank_knots(np.r_[reference, np.full(50, 0.5)])}}  # ties merged
    assert np.all(np.diff(spec["knots"]["Pneumonia"]["logit"]) > 0)
    assessed = np.array([label == "Pneumonia" for label in LABELS])
    y = rng.random(600) < 0.4
    raw = expit(rng.normal(0, 1.5, 600) + 1.2 * y)
    child = rng.random(600) < 0.5
    calibrated = np.where(child, apply_map(raw, {"method": "platt", "a": 1.3, "b": 1.0}),
                          apply_map(raw, {"method": "platt", "a": 0.3, "b": -4.0}))
    ranks = np.array([rank_scores(np.full(15, r), spec, assessed)["Pneumonia"] for r in raw])
    assert rank_scores(np.full(15, 0.5), spec, assessed)["Cardiomegaly"] is None
    assert rank_scores(np.full(15, 0.5), None, assessed) is None
    assert abs(roc_auc_score(y, ranks) - roc_auc_score(y, raw)) < 0.005
    assert abs(roc_auc_score(y, calibrated) - roc_auc_score(y, raw)) > 0.02  # mixed scales break ranking
    assert rank_scores(np.full(15, float(np.median(reference))), spec, assessed)["Pneumonia"] == pytest.approx(50, abs=1)
