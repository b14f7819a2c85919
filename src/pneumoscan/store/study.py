"""Reader studies in the results store: define one (cases = stored results with their truth,
readers, a design, a seed), hand each reader their next reading, keep the ratings (append-only),
and give them back as :class:`pneumoscan.readerstudy.ratings.Ratings` for the Obuchowski–Rockette analysis.

Designs: **sequential** — each case read unaided, then at once aided, the cases in a seeded order
per reader; **crossover** — every case unaided, then (after a washout, 4 weeks by default, counted
from the reader's last reading of the first arm and enforced) every case aided, each arm in its
own seeded order; half the readers (every second) read the aided arm first. In the unaided arm
nothing of the model's output leaves the server (:func:`step_view`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from pneumoscan.errors import PneumoScanError
from pneumoscan.labels import LABELS
from pneumoscan.store.db import NotFound, Store, StoreError
from pneumoscan.store.records import aware, now
from pneumoscan.store.schema import (
    Layers,
    Reader,
    Result,
    Study,
    StudyCase,
    StudyRating,
    StudyStep,
)

DESIGNS = ("sequential", "crossover")
ARMS = ("unaided", "aided")
DEFAULT_WASHOUT_DAYS = 28.0


class StudyError(PneumoScanError, ValueError):
    """A study that cannot be made, or a reading that cannot be taken as sent (the message says why)."""


class Waiting(StudyError):
    """The reader's next reading is behind the washout."""


def plan_steps(case_ids: list[int], n_readers: int, design: str, seed: int) -> list[list[tuple[int, str, bool]]]:
    """Per reader, their steps in order: (case id, arm, whether a washout comes before it). A pure
    function of its arguments: the same seed gives every reader the same order again."""
    plans = []
    for k in range(n_readers):
        rng = np.random.default_rng([seed, k])
        if design == "sequential":
            order = [case_ids[i] for i in rng.permutation(len(case_ids))]
            plans.append([(case, arm, False) for case in order for arm in ARMS])
        else:
            first, second = (ARMS if k % 2 == 0 else ARMS[::-1])
            one = [case_ids[i] for i in rng.permutation(len(case_ids))]
            two = [case_ids[i] for i in rng.permutation(len(case_ids))]
            plans.append([(case, first, False) for case in one] + [(case, second, n == 0) for n, case in enumerate(two)])
    return plans


def study_exists(store: Store, name: str) -> bool:
    """Whether the store already holds a study of that name (checked before its cases are predicted)."""
    with store.session("looking up a study") as session:
        return session.scalar(select(Study.id).where(Study.name == name)) is not None


def create_study(store: Store, name: str, *, design: str, targets: list[str], readers: list[str],
                 cases: list[tuple[int, dict[str, int]]], seed: int = 2019,
                 washout_days: float = DEFAULT_WASHOUT_DAYS) -> int:
    """A new study of ``cases`` (result id, {target: 0/1}) for the named readers (who must exist)."""
    name = (name or "").strip()
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise StudyError("a study's name is 1 to 64 letters, digits, - or _")
    if design not in DESIGNS:
        raise StudyError(f"design is one of {', '.join(DESIGNS)}")
    if washout_days < 0:
        raise StudyError("the washout is 0 days or more")
    bad = [t for t in targets if t not in LABELS or t == "No Finding"]
    if not targets or bad:
        raise StudyError(f"targets are findings of the 15 labels (not No Finding){': not ' + ', '.join(bad) if bad else ''}")
    if len(set(readers)) < 2:
        raise StudyError("an MRMC study needs at least 2 readers")
    for target in targets:
        values = {truth.get(target) for _, truth in cases}
        if values != {0, 1}:
            raise StudyError(f"every case needs a truth of 0 or 1 for {target}, and both must occur "
                             f"(found {sorted(values, key=str)})")
    try:
        with store.session(f"creating study {name}") as session:
            known = {r.name: r for r in session.scalars(select(Reader).where(Reader.name.in_(readers)))}
            missing = [r for r in readers if r not in known]
            if missing:
                raise StudyError(f"no such readers: {', '.join(missing)} (pneumoscan review readers add NAME)")
            study = Study(name=name, design=design, washout_days=float(washout_days), targets=list(targets), seed=seed,
                          created_at=now())
            session.add(study)
            session.flush()
            rows = [StudyCase(study_id=study.id, result_id=result_id, truth={t: int(truth[t]) for t in targets})
                    for result_id, truth in cases]
            session.add_all(rows)
            session.flush()
            for reader_name, plan in zip(dict.fromkeys(readers), plan_steps([c.id for c in rows], len(set(readers)),
                                                                              design, seed)):
                session.add_all(StudyStep(study_id=study.id, reader_id=known[reader_name].id, position=n, case_id=case,
                                          arm=arm, washout_before=washout) for n, (case, arm, washout) in enumerate(plan))
            return study.id
    except IntegrityError:
        raise StudyError(f"a study named {name!r} exists already, or a case is listed twice") from None


def _study(session, name: str) -> Study:
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        raise NotFound(f"no study {name!r}")
    return study


def studies_of(store: Store, reader: Reader) -> list[dict[str, Any]]:
    """The studies this reader reads in, with their progress."""
    with store.session("listing studies") as session:
        rows = session.execute(
            select(Study, func.count(StudyStep.id)).join(StudyStep, StudyStep.study_id == Study.id)
            .where(StudyStep.reader_id == reader.id).group_by(Study.id).order_by(Study.name)).all()
        out = []
        for study, total in rows:
            done = session.scalar(select(func.count(StudyStep.id.distinct()))
                                  .join(StudyRating, StudyRating.step_id == StudyStep.id)
                                  .where(StudyStep.study_id == study.id, StudyStep.reader_id == reader.id))
            out.append({"name": study.name, "design": study.design, "targets": study.targets, "done": done, "total": total})
    return out


def next_step(store: Store, name: str, reader: Reader, at: datetime | None = None) -> dict[str, Any]:
    """The reader's next reading (the first of their steps without a rating), or that they are
    done, or until when the washout holds it back."""
    at = at or now()
    with store.session("finding the next reading") as session:
        study = _study(session, name)
        steps = session.scalars(select(StudyStep).where(StudyStep.study_id == study.id, StudyStep.reader_id == reader.id)
                                .order_by(StudyStep.position)).all()
        if not steps:
            raise PermissionError(f"{reader.name} is not a reader of study {name}")
        rated = set(session.scalars(select(StudyRating.step_id).where(StudyRating.step_id.in_([s.id for s in steps]))))
        progress = {"study": name, "design": study.design, "targets": study.targets, "done": len(rated),
                    "total": len(steps)}
        step = next((s for s in steps if s.id not in rated), None)
        if step is None:
            return progress | {"step": None}
        if step.washout_before:
            last = session.scalar(select(func.max(StudyRating.created_at)).where(StudyRating.step_id.in_(rated)))
            until = aware(last) + timedelta(days=study.washout_days) if last is not None else None
            if until is not None and at < until:
                return progress | {"step": None, "waiting_until": until.isoformat()}
        return progress | {"step": step_view(session, study, step)}


def step_view(session, study: Study, step: StudyStep) -> dict[str, Any]:
    """What the page may show for a step: in the unaided arm only the film (as a JPEG) and the
    question; in the aided arm also the model's probability, threshold and call per target, the
    targets' own heat maps (never another label's), the outlines, the cardiothoracic ratio or why
    none, and which target has no stored map. Nothing of the model's output is in an unaided answer."""
    case = session.get(StudyCase, step.case_id)
    layers = session.get(Layers, case.result_id)
    view = {"step_id": step.id, "position": step.position, "arm": step.arm, "case": f"case {case.id}",
            "preview": layers.preview, "width": layers.width, "height": layers.height}
    if step.arm == "aided":
        record = session.get(Result, case.result_id).record
        view["model"] = {t: {"probability": (record.get("probabilities") or {}).get(t),
                             "threshold": (record.get("thresholds") or {}).get(t),
                             "called": t in (record.get("findings") or [])} for t in study.targets}
        # the study target's own explanation only: another label's map beside a target's score
        # would show the reader the wrong evidence
        heat = {label: png for label, png in (layers.heat or {}).items() if label in study.targets}
        view["layers"] = {"scale": layers.scale, "lungs": layers.lungs, "heart": layers.heart, "heat": heat}
        measurements = record.get("measurements") or {}
        view["heart"] = {"cardiothoracic_ratio": measurements.get("cardiothoracic_ratio"),
                         "reason": measurements.get("cardiothoracic_ratio_reason"),
                         "unreliable": (record.get("mask_quality") or {}).get("unreliable") or []}
        view["missing_maps"] = [t for t in study.targets if t not in heat and t != "Cardiomegaly"]
    return view


def _check_rating(value: Any, target: str) -> tuple[float, bool]:
    if (not isinstance(value, dict) or not isinstance(value.get("score"), int | float) or isinstance(value.get("score"), bool)
            or not isinstance(value.get("call"), bool)):
        raise StudyError(f"{target}: a rating is {{'score': 0–100, 'call': true/false}}")
    score = float(value["score"])
    if not 0 <= score <= 100:
        raise StudyError(f"{target}: the score is from 0 to 100")
    return score, value["call"]


def rate(store: Store, name: str, reader: Reader, step_id: int, ratings: Any, seconds: Any = None) -> dict[str, Any]:
    """The reader's rating of their current step (every target); a step already rated, or one
    that is not yet theirs to read, is refused."""
    if seconds is not None and (not isinstance(seconds, int | float) or not 0 <= seconds <= 86400):
        raise StudyError("'seconds' is a number from 0 to 86400")
    with store.session("checking a reading") as session:
        if session.scalar(select(StudyRating.id).where(StudyRating.step_id == step_id).limit(1)) is not None:
            raise StudyError("this reading is already rated (send a correction with a reason)")
    current = next_step(store, name, reader)
    if current.get("waiting_until"):
        raise Waiting(f"the washout holds your next reading until {current['waiting_until'][:16].replace('T', ' ')} UTC")
    step = current.get("step")
    if step is None or step["step_id"] != step_id:
        raise StudyError("this reading is not yours, or its study is done" if step is None
                         else "read the cases in the order given")
    if not isinstance(ratings, dict) or set(ratings) != set(current["targets"]):
        raise StudyError(f"rate each target: {', '.join(current['targets'])}")
    checked = {target: _check_rating(ratings[target], target) for target in current["targets"]}
    try:
        with store.session("storing a rating") as session:
            moment = now()
            session.add_all(StudyRating(step_id=step_id, target=target, seq=1, score=score, call=call,
                                        seconds=None if seconds is None else float(seconds), created_at=moment)
                            for target, (score, call) in checked.items())
    except IntegrityError:
        raise StudyError("this reading is already rated (send a correction with a reason)") from None
    return {"rated": step_id, "done": current["done"] + 1, "total": current["total"]}


def correct(store: Store, name: str, reader: Reader, step_id: int, target: str, rating: Any, reason: Any) -> dict[str, Any]:
    """A recorded correction of one of the reader's rated steps: a new rating with its reason;
    the analysis uses the latest, the first stays."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise StudyError("a correction needs its reason (up to 500 characters)")
    score, call = _check_rating(rating, target)
    for _ in range(5):
        try:
            with store.session("storing a correction") as session:
                study = _study(session, name)
                step = session.get(StudyStep, step_id)
                if step is None or step.study_id != study.id or step.reader_id != reader.id:
                    raise NotFound(f"no reading {step_id} of yours in study {name}")
                seq = session.scalar(select(func.max(StudyRating.seq)).where(StudyRating.step_id == step_id,
                                                                             StudyRating.target == target))
                if seq is None:
                    raise StudyError("only a rated reading can be corrected")
                session.add(StudyRating(step_id=step_id, target=target, seq=seq + 1, score=score, call=call, seconds=None,
                                        correction=reason.strip(), created_at=now()))
                return {"corrected": step_id, "target": target, "seq": seq + 1}
        except IntegrityError:
            continue
    raise StoreError("the correction collided with another; send it again")


def study_data(store: Store, name: str, target: str | None = None) -> dict[str, Any]:
    """The study's latest ratings of ``target`` (default its first): the MRMC ratings, the binary
    calls, the reading times, and the model's probabilities on the same cases."""
    from pneumoscan.readerstudy.ratings import Ratings

    with store.session("reading the study") as session:
        study = _study(session, name)
        target = target or study.targets[0]
        if target not in study.targets:
            raise StudyError(f"study {name} rates {', '.join(study.targets)}, not {target}")
        rows = session.execute(
            select(StudyStep, StudyRating, Reader.name, StudyCase)
            .join(StudyRating, StudyRating.step_id == StudyStep.id).join(Reader, Reader.id == StudyStep.reader_id)
            .join(StudyCase, StudyCase.id == StudyStep.case_id)
            .where(StudyStep.study_id == study.id, StudyRating.target == target)
            .order_by(StudyRating.seq)).all()
        cases = session.execute(select(StudyCase, Result.record).join(Result, Result.id == StudyCase.result_id)
                                .where(StudyCase.study_id == study.id).order_by(StudyCase.id)).all()
        steps_total = session.scalar(select(func.count(StudyStep.id)).where(StudyStep.study_id == study.id)) or 0
        readers = sorted({r for _, _, r, _ in rows})
    latest = {}
    for step, rating, reader, case in rows:  # ordered by seq: the last one wins
        latest[(reader, step.arm, case.id)] = (rating.score, rating.call, rating.seconds)
    if len(latest) < steps_total:
        raise StudyError(f"study {name}: {len(latest)} of {steps_total} readings rated so far; analyse when all are in")
    case_ids = [case.id for case, _ in cases]
    truth = np.array([case.truth[target] for case, _ in cases])
    index = {c: k for k, c in enumerate(case_ids)}
    shape = (len(ARMS), len(readers), len(case_ids))
    scores, calls, seconds = np.full(shape, np.nan), np.zeros(shape, bool), np.full(shape, np.nan)
    for (reader, arm, case_id), (score, call, spent) in latest.items():
        where = (ARMS.index(arm), readers.index(reader), index[case_id])
        scores[where], calls[where], seconds[where] = score, call, np.nan if spent is None else spent
    model = np.array([(record.get("probabilities") or {}).get(target, np.nan) or np.nan for _, record in cases], float)
    ratings = Ratings(scores, truth, list(ARMS), readers, [f"case {c}" for c in case_ids], f"study {name}: {target}")
    return {"ratings": ratings, "calls": calls, "seconds": seconds, "model": model, "target": target,
            "design": study.design}


def study_extras(data: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """What the store adds to the ROC analysis: per reader and arm the binary calls' sensitivity
    and specificity and the mean reading time; the time difference between the arms over readers
    (paired t interval); the model alone as a reader (its AUC on the same cases) beside the
    readers' average AUC per arm."""
    from scipy import stats

    from pneumoscan.readerstudy.mrmc import trapezoidal_auc

    ratings, calls, seconds = data["ratings"], data["calls"], data["seconds"]
    truth = ratings.truth.astype(bool)
    per = {}
    for i, arm in enumerate(ratings.treatments):
        per[arm] = {reader: {"sensitivity": round(float(calls[i, j, truth].mean()), 4),
                             "specificity": round(float(1 - calls[i, j, ~truth].mean()), 4),
                             "mean_seconds": (None if np.isnan(seconds[i, j]).all()
                                              else round(float(np.nanmean(seconds[i, j])), 2))}
                    for j, reader in enumerate(ratings.readers)}
    times = np.nanmean(seconds, axis=2) if not np.isnan(seconds).all() else None
    timing = None
    if times is not None and not np.isnan(times).any():
        diff = times[1] - times[0]
        half = stats.t.ppf(1 - alpha / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.nan
        timing = {"mean_seconds": {arm: round(float(times[i].mean()), 2) for i, arm in enumerate(ratings.treatments)},
                  "difference": f"{ratings.treatments[1]} − {ratings.treatments[0]}",
                  "mean_difference": round(float(diff.mean()), 2),
                  "ci": [round(float(diff.mean() - half), 2), round(float(diff.mean() + half), 2)]}
    model = data["model"]
    known = ~np.isnan(model)  # a case the model refused, or did not assess this target on, is left out
    stand_alone = None
    if len(set(ratings.truth[known].tolist())) == 2:
        readers = trapezoidal_auc(ratings.scores[:, :, known], ratings.truth[known]).mean(axis=1)
        stand_alone = {"auc": round(float(trapezoidal_auc(model[None, None, known], ratings.truth[known])[0, 0]), 4),
                       "cases": int(known.sum()), "left_out": int((~known).sum()),
                       "readers_average_auc": {arm: round(float(v), 4) for arm, v in zip(ratings.treatments, readers)}}
    return {"target": data["target"], "design": data["design"], "calls": per, "reading_time": timing, "model_alone": stand_alone}
