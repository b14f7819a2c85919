"""One film, one answer: the film's population, probabilities calibrated for it, and one verdict.

Why each piece:

- **Population.** The classifier learnt from adults (NIH, Montgomery, Shenzhen…) and from
  children (Kermany), but its adult findings were assessed on adults only; a child's normal
  cardiothoracic ratio reaches about 0.6, an adult's 0.5. Each film is read as ``adult`` or
  ``paediatric`` (DICOM PatientAge, or an age the caller gives, wins; else an estimate from the
  film by linear heads on the backbone's pooled features), or ``unknown`` when neither tells.
  Assessed labels and thresholds are kept per population: a child never gets an adult-only
  finding; a film of unknown age is read with the adult reading, and says so (an adult must not
  lose the adult findings because the estimate could not place the film).
- **Calibration.** The head's raw outputs are not probabilities (out-of-fold ECE 0.16–0.30 on
  adult films). A per-label map fitted on out-of-fold scores (Platt: ``a·logit(p) + b``, or an
  isotonic step function) plus a prior shift of the log-odds (Saerens et al. 2002) makes each
  printed number "the chance this label is present in a film of population P", P named in the
  model file and in every record. The maps are monotone, so calls are made on the raw scale at the
  stored thresholds (their sensitivity and specificity unchanged) and the thresholds are shown
  on the calibrated scale.
- **Verdict.** ``abnormal`` when an assessed finding is called, ``normal`` when No Finding is
  called (at the population's normal rule, whose out-of-fold NPV reaches the file's figure) and
  nothing else is, ``indeterminate`` otherwise, or ``no finding called`` where the population has
  no such rule: No Finding is never listed beside a finding.
- **Rank.** Calibrated probabilities live on their population's scale; ``rank_scores`` put every
  film on one (the raw score's percentile among the development films) for sorting and ROC curves.

A model file without a ``reading`` section (older files) gives uncalibrated scores (its records
say ``calibrated_for: null``) and reads every film whose header has no age as ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np

from pneumoscan.labels import LABELS


class Group(StrEnum):
    """Who a film is read for."""

    ADULT = "adult"
    PAEDIATRIC = "paediatric"
    UNKNOWN = "unknown"


class Verdict(StrEnum):
    """One verdict per scored film. ``no finding called``: nothing was called, and this model cannot
    call a film of this population normal (no operating point of No Finding reaches the negative
    predictive value its file asks for)."""

    NORMAL = "normal"
    ABNORMAL = "abnormal"
    INDETERMINATE = "indeterminate"
    NO_FINDING_CALLED = "no finding called"


class Status(StrEnum):
    """A record's status: an assessed finding called, scored with none called, refused by the input
    gate, or unreadable."""

    CALLED = "called"
    NOT_CALLED = "not called"
    REFUSED = "refused"
    ERROR = "error"


GROUPS, VERDICTS, STATUSES = tuple(Group), tuple(Verdict), tuple(Status)
#: The words each verdict is shown with.
VERDICT_WORDS = {
    "normal": "normal: No Finding called and nothing else",
    "abnormal": "abnormal: at least one assessed finding called",
    "indeterminate": "indeterminate: neither a finding nor No Finding called",
    "no finding called": "no finding called: nothing reached its threshold, and this model never calls a film of "
                         "this population normal",
}
#: Age in years from which a film is read as an adult's.
ADULT_AGE = 18.0
#: The range an estimated age is shown in (the training ages: Kermany's children are 1–5 years
#: old, NIH's oldest 91; a linear estimate outside it means nothing more).
AGE_RANGE = (1.0, 95.0)
#: Adult prevalence of each label in the full NIH ChestX-ray14 label list (Data_Entry_2017_v2020,
#: 106,718 films of patients aged 18 or more; torchxrayvision's package data, commit f4087a0b):
#: the default population the adult probabilities are calibrated for.
NIH_ADULT_PREVALENCE = {
    "Atelectasis": 0.10498, "Cardiomegaly": 0.0246, "Consolidation": 0.0411, "Edema": 0.02046,
    "Effusion": 0.12049, "Emphysema": 0.02258, "Fibrosis": 0.01563, "Hernia": 0.00212,
    "Infiltration": 0.17602, "Mass": 0.05232, "No Finding": 0.53615, "Nodule": 0.05772,
    "Pleural_Thickening": 0.03064, "Pneumonia": 0.01236, "Pneumothorax": 0.04665,
}
NIH_ADULT_POPULATION = ("adult frontal chest films at NIH ChestX-ray14 prevalence (the full label list's "
                        "106,718 films of patients aged 18 or more)")
_EPS = 1e-6


def logit(p: float | np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def expit(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def prior_shift(from_prevalence: float, to_prevalence: float) -> float:
    """Log-odds added to a calibrated posterior to move it from one prevalence to another
    (Saerens et al. 2002, for a calibrated score): logit(π_to) − logit(π_from)."""
    return float(logit(to_prevalence) - logit(from_prevalence))


def apply_map(p: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Raw probabilities of one label → calibrated ones, by a stored map: ``platt`` (``a``, ``b``
    on the raw logit) or ``isotonic`` (``x``, ``y`` knots, linear between them), then ``shift``
    added to the log-odds."""
    p = np.asarray(p, np.float64)
    if spec["method"] == "platt":
        z = spec["a"] * logit(p) + spec["b"]
    elif spec["method"] == "isotonic":
        z = logit(np.interp(p, spec["x"], spec["y"]))
    else:
        raise ValueError(f"unknown calibration method {spec['method']!r}")
    return expit(z + float(spec.get("shift", 0.0)))


@dataclass(frozen=True)
class Population:
    """Who the film is read for: ``group`` (:class:`Group`), the age in years (None when not
    known), where it came from (``PatientAge``, ``given`` or ``estimate``) and why, in words."""

    group: Group
    age: float | None = None
    source: str | None = None
    reason: str = ""
    paediatric_probability: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"group": self.group, "age": None if self.age is None else round(float(self.age), 1),
               "source": self.source, "reason": self.reason}
        if self.paediatric_probability is not None:
            out["paediatric_probability"] = round(float(self.paediatric_probability), 4)
        return out


def group_of_age(age: float) -> Group:
    return Group.ADULT if age >= ADULT_AGE else Group.PAEDIATRIC


def _years(age: float) -> str:
    return f"{age:.0f} y" if age >= 2 else f"{age * 12:.0f} months"


def population_from_age(age: float, source: str) -> Population:
    """A stated age (DICOM PatientAge, or one the caller gave) decides the group."""
    where = "DICOM PatientAge" if source == "PatientAge" else "age given"
    return Population(group_of_age(age), float(age), source, f"{where} {_years(age)}")


def estimate_population(pooled: np.ndarray, model: dict[str, Any] | None) -> Population:
    """The population estimated from one film's pooled backbone features by the model file's
    ``age_model``: a linear age regression (for the age shown) and a linear paediatric-vs-adult
    head whose out-of-fold thresholds mark the films it cannot tell (``unknown``)."""
    if not model:
        return Population(Group.UNKNOWN, None, None, "no age in the header and this model has no age estimate")
    x = np.asarray(pooled, np.float64)
    age = float(np.clip(x @ np.asarray(model["age"]["w"]) + model["age"]["b"], *AGE_RANGE))
    child = float(expit(x @ np.asarray(model["paediatric"]["w"]) + model["paediatric"]["b"]))
    cut = model["paediatric"]
    if child >= cut["paediatric_at"]:
        group = Group.PAEDIATRIC
    elif child < cut["adult_below"]:
        group = Group.ADULT
    else:
        group = Group.UNKNOWN
    reason = {"paediatric": "a child's film", "adult": "an adult's film",
              "unknown": "cannot tell a child's film from an adult's"}[group]
    return Population(group, age, "estimate", f"estimated from the film: {reason} (paediatric probability "
                                              f"{child:.2f}, estimated age {_years(age)})", child)


def status_of(record: dict[str, Any]) -> Status:
    """One record's status (:data:`STATUSES`): ``called`` (an assessed finding other than No
    Finding at or above its threshold), ``not called`` (scored, no such finding), ``refused``
    (the input gate said it is not a frontal chest X-ray) or ``error`` (unreadable)."""
    if record.get("error"):
        return Status.ERROR
    if record.get("probabilities") is None:
        return Status.REFUSED
    return Status.CALLED if [f for f in record.get("findings") or [] if f != "No Finding"] else Status.NOT_CALLED


def assessed_thresholds(record: dict[str, Any]) -> dict[str, float]:
    """The thresholds of the labels the film was assessed for (the others have none)."""
    return {label: t for label, t in (record.get("thresholds") or {}).items() if t is not None}


def verdict_of(findings: list[str] | None, scored: bool, normal_possible: bool = True) -> Verdict | None:
    """``abnormal`` / ``normal`` / ``indeterminate`` from a film's called labels (None when it was
    not scored); ``no finding called`` instead of ``indeterminate`` when the film's reading can
    never call a film normal (:attr:`Reading.normal_possible`)."""
    if not scored:
        return None
    if any(f != "No Finding" for f in findings or []):
        return Verdict.ABNORMAL
    if "No Finding" in (findings or []):
        return Verdict.NORMAL
    return Verdict.INDETERMINATE if normal_possible else Verdict.NO_FINDING_CALLED


def verdict_reason(verdict: str | None, reading: Reading, findings: list[str] | None = None,
                   adult_only: set[str] | None = None) -> str | None:
    """The verdict in words, with why a film of this population is never called normal, and for a
    film of unknown age read with the adult reading, which of its calls a child's film would not
    have been assessed for (``adult_only``)."""
    if verdict is None:
        return None
    words = VERDICT_WORDS[verdict]
    rule = reading.normal or {}
    if verdict == "no finding called" and rule.get("reason"):
        words += f": {rule['reason']}"
    elif verdict == "normal" and rule.get("npv") is not None:
        words += (f", at an operating point whose negative predictive value is {rule['npv']:.2f} out of fold "
                  f"(target {rule['npv_target']:.2f}, {rule['population']})")
    caveat = [f for f in findings or [] if f in (adult_only or set())]
    if reading.group == "unknown" and caveat:
        words += (f"; {', '.join(caveat)} called with the adult reading because the film's age is not known: a "
                  f"child's film is not assessed for {'it' if len(caveat) == 1 else 'them'} (give the patient's age)")
    return words


def adult_only_labels(readings_of: dict[str, Reading]) -> set[str]:
    """Labels the adult reading assesses and the paediatric one does not."""
    adult, child = readings_of["adult"], readings_of["paediatric"]
    return {label for label, a, c in zip(LABELS, adult.assessed, child.assessed) if a and not c}


def one_verdict(called: list[str]) -> list[str]:
    """The findings a film is reported with: No Finding only when nothing else is called."""
    diseases = [label for label in called if label != "No Finding"]
    return diseases if diseases else [label for label in called if label == "No Finding"]


@dataclass(frozen=True)
class Reading:
    """How films of one population are read: which labels are assessed, their raw thresholds and
    the calibration maps (label → spec), for ``calibrated_for`` (None: uncalibrated)."""

    group: Group
    assessed: np.ndarray
    thresholds: np.ndarray
    maps: dict[str, dict[str, Any]]
    calibrated_for: str | None
    #: The model file's rule for calling a film of this population normal (``threshold`` on the
    #: raw No Finding score, or None: never; ``npv`` and its evidence); None: an older file, whose
    #: No Finding threshold is the assessment's.
    normal: dict[str, Any] | None = None

    @property
    def normal_possible(self) -> bool:
        """Whether a film of this population can ever be called normal."""
        j = LABELS.index("No Finding")
        return bool(self.assessed[j]) and not np.isnan(self.thresholds[j])

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """N×15 raw probabilities → calibrated ones (unchanged where a label has no map)."""
        out = np.array(probs, np.float64, copy=True)
        for j, label in enumerate(LABELS):
            if label in self.maps:
                out[..., j] = apply_map(out[..., j], self.maps[label])
        return out

    def shown_thresholds(self) -> dict[str, float | None]:
        """Each assessed label's threshold on the printed (calibrated) scale."""
        shown = self.calibrate(np.nan_to_num(self.thresholds, nan=0.5)[None])[0]
        return {label: round(float(t), 6) if a and not np.isnan(raw) else None
                for label, t, raw, a in zip(LABELS, shown, self.thresholds, self.assessed)}

    def called(self, raw: np.ndarray) -> list[str]:
        """Assessed labels at or above their threshold on the raw scale (the calibration maps
        are monotone, so this is the calibrated call too)."""
        return [label for label, p, t, a in zip(LABELS, raw, self.thresholds, self.assessed) if a and p >= t]


def rule_fits(reading: Reading, rule: dict[str, Any]) -> bool:
    """Whether a normal rule was judged with this reading's thresholds (its NPV depends on which
    findings are called): a file whose thresholds were changed since (a site's ``calibrate``, a
    test's assessment) does not inherit a rule judged at others."""
    fitted = rule.get("fitted_thresholds")
    if fitted is None:
        return True
    current = {label: float(t) for label, t, a in zip(LABELS, reading.thresholds, reading.assessed) if a}
    current.pop("No Finding", None)
    fitted = {label: t for label, t in fitted.items() if label != "No Finding"}
    return set(current) == set(fitted) and all(abs(current[k] - float(fitted[k])) < 1e-9 for k in current)


def with_normal_rule(reading: Reading, rule: dict[str, Any] | None) -> Reading:
    """``reading`` whose No Finding threshold is the normal rule's (NaN when the rule says this
    population is never called normal): a film is called normal only at that operating point.
    A rule judged at other thresholds (:func:`rule_fits`) is not applied."""
    if rule is None or not rule_fits(reading, rule):
        return reading
    j = LABELS.index("No Finding")
    thresholds = np.array(reading.thresholds, np.float64, copy=True)
    thresholds[j] = np.nan if rule.get("threshold") is None else float(rule["threshold"])
    return replace(reading, thresholds=thresholds, normal=rule)


def readings(meta: dict[str, Any], assessed: np.ndarray, thresholds: np.ndarray) -> dict[str, Reading]:
    """The three readings of a model file: ``adult`` (the file's top-level assessment, which
    ``calibrate`` rewrites for a site), ``paediatric`` (its ``reading.populations.paediatric``)
    and ``unknown``: a film whose age is neither stated nor estimated is read with the adult
    reading (its labels, thresholds and calibration; the record says the age is not known), so
    that an adult never loses the adult findings; a child's film is read as ``unknown`` only when
    the estimate cannot tell (Kermany out of fold: 4 %), and the CTR's adult cut-off is then
    applied with a note. Without a ``reading`` section every group reads like the top-level
    assessment, uncalibrated. Each population's ``normal`` rule, when the file has one, sets the
    No Finding threshold that calls a film normal (:func:`with_normal_rule`)."""
    section = meta.get("reading") or {}
    populations = section.get("populations") or {}
    adult_spec = populations.get("adult") or {}
    adult = with_normal_rule(Reading(Group.ADULT, assessed, thresholds, adult_spec.get("calibration") or {},
                                     adult_spec.get("calibrated_for")), adult_spec.get("normal"))
    unknown = replace(adult, group=Group.UNKNOWN,
                      calibrated_for=adult.calibrated_for and f"{adult.calibrated_for} (the film's age is not known: "
                                                              f"read with the adult reading)")
    if "paediatric" not in populations:
        return {Group.ADULT: adult, Group.PAEDIATRIC: replace(adult, group=Group.PAEDIATRIC), Group.UNKNOWN: unknown}
    spec = populations["paediatric"]
    ped_assessment = spec.get("assessment") or {}
    ped_assessed = np.array([bool((ped_assessment.get(lab) or {}).get("assessed")) for lab in LABELS])
    ped_thresholds = np.array([(ped_assessment.get(lab) or {}).get("threshold") if a else np.nan
                               for lab, a in zip(LABELS, ped_assessed)], np.float64)
    paediatric = with_normal_rule(Reading(Group.PAEDIATRIC, ped_assessed, ped_thresholds, spec.get("calibration") or {},
                                          spec.get("calibrated_for")), spec.get("normal"))
    return {Group.ADULT: adult, Group.PAEDIATRIC: paediatric, Group.UNKNOWN: unknown}


def rank_scores(raw: np.ndarray, spec: dict[str, Any] | None, assessed: np.ndarray) -> dict[str, float | None] | None:
    """Each assessed label's rank score: the percentile (0–100) of the film's raw score among the
    model's development films (the file's ``reading.rank``: per label, knots of the raw logit and
    their percentiles, linear between them), the same function for every population.
    Calibrated probabilities are on their population's scale, so films read for different
    populations do not rank on them; the rank score is monotone in the raw score, so an ROC curve
    on it is the model's own on any mix of films. None without a ``rank`` section."""
    if not spec:
        return None
    out: dict[str, float | None] = {}
    for label, p, a in zip(LABELS, np.asarray(raw, np.float64), assessed):
        knots = spec["knots"].get(label)
        out[label] = (round(float(np.interp(logit(p), knots["logit"], knots["percentile"])), 4)
                      if a and knots is not None else None)
    return out


def rank_knots(raw: np.ndarray, steps: int = 400) -> dict[str, list[float]]:
    """One label's rank knots from the development films' raw scores: the logit at ``steps`` + 1
    evenly spaced percentiles, ties merged so that the knots increase strictly."""
    z = logit(np.asarray(raw, np.float64))
    percentiles = np.linspace(0, 100, steps + 1)
    knots = np.round(np.quantile(z, percentiles / 100), 5)
    keep = np.r_[np.diff(knots) > 0, True]  # of tied knots, the highest percentile
    return {"logit": [float(v) for v in knots[keep]], "percentile": [round(float(v), 3) for v in percentiles[keep]]}
