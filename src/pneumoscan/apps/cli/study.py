"""Reader studies: ``pneumoscan study create`` (a study in the results store, read at ``/study``)
and ``pneumoscan study analyse`` (the Obuchowski–Rockette–Hillis analysis of :mod:`pneumoscan.readerstudy.mrmc`
on a study in the store, a ratings CSV, an Iowa ``.lrc`` or an iMRMC ``.imrmc`` file)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from pneumoscan.apps.cli.common import (
    DbOption,
    QuietOption,
    app,
    console,
    ensure_writable,
    err,
    fail,
    load_predictor,
    open_store,
)
from pneumoscan.errors import PneumoScanError

study_app = typer.Typer(help="Reader studies: readers with and without PneumoScan (MRMC analysis).",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The study's name (letters, digits, - and _).")],
    cases: Annotated[Path, typer.Option(exists=True, dir_okay=False, help=(
        "Case list: a CSV with a 'path' column (the films) and one 0/1 column per --target (the truth)."))],
    target: Annotated[list[str], typer.Option(help="The finding(s) the readers rate (repeat for more).")],
    reader: Annotated[list[str], typer.Option(help="A reader (made with `pneumoscan review readers add`); repeat.")],
    db: DbOption = None,
    design: Annotated[str, typer.Option(help="sequential (unaided then aided per case, one sitting) or crossover "
                                             "(all unaided, washout, all aided; half the readers the other way).")] = "crossover",
    washout_days: Annotated[float, typer.Option(min=0, help="Crossover: days between a reader's two arms (enforced).")] = 28.0,
    seed: Annotated[int, typer.Option(help="Seeds each reader's case order (the same seed, the same orders).")] = 2019,
    model: Annotated[Path | None, typer.Option(help="Classifier for the aided arm (default: shipped).")] = None,
    quiet: QuietOption = False,
) -> None:
    """A reader study in the results store: the cases are predicted once (the aided arm shows that
    output), each reader gets a seeded order per arm; readers read at /study of `serve --db`."""
    import pandas as pd

    from pneumoscan.outputs.writer import write_to_store
    from pneumoscan.progress import bar as progress_bar
    from pneumoscan.store.study import DESIGNS, StudyError, create_study, study_exists

    if design not in DESIGNS:
        fail(f"--design must be one of {', '.join(DESIGNS)}")
    try:
        table = pd.read_csv(cases)
    except (OSError, ValueError) as exc:
        fail(f"{cases}: {exc}")
    missing = [c for c in ["path", *target] if c not in table]
    if missing:
        fail(f"{cases}: missing columns {', '.join(missing)} (a 'path' column and one 0/1 column per --target)")
    bad = [t for t in target if not table[t].isin([0, 1]).all()]
    if bad:
        fail(f"{cases}: the truth columns must hold 0 or 1 only ({', '.join(bad)})")
    paths = [(cases.parent / p if not Path(p).is_absolute() else Path(p)) for p in table["path"].astype(str)]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        fail(f"{len(absent)} case file(s) not found, e.g. {absent[0]}")
    twice = sorted(str(p) for p, n in Counter(paths).items() if n > 1)
    if twice:  # found before anything is predicted or stored
        fail(f"{cases}: {len(twice)} case(s) listed twice, e.g. {twice[0]}")
    store = open_store(db)
    if study_exists(store, name):
        fail(f"a study named {name!r} exists already; choose another name")
    predictor = load_predictor(None, model, backend="auto", device="cpu", allow_model_mismatch=False)
    run = predictor.run_identity()
    ids = []
    with progress_bar(len(paths), "predict", unit="case") as bar:
        # the aided arm shows each study target's own map: ask for them, not for the top finding's
        asked = ",".join(t for t in target if t in predictor.classifier.assessed_labels) or "top"
        for path, result in zip(paths, predictor.predict_many(paths, cam=asked, keep_arrays=True)):
            record = write_to_store(store, result.to_dict(), result, None, name=path.name, path=path, run=run,
                                    source="study")
            if result.error or "store_id" not in record:
                fail(f"{path}: {result.error or record.get('store_error')}")
            ids.append(record["store_id"])
            bar.update(1)
    truths = [{t: int(table[t].iloc[i]) for t in target} for i in range(len(table))]
    try:
        create_study(store, name, design=design, targets=list(target), readers=list(reader),
                     cases=list(zip(ids, truths)), seed=seed, washout_days=washout_days)
    except StudyError as exc:
        fail(str(exc))
    store.close()
    err.print(f"study {name}: {len(ids)} cases × {len(set(reader))} readers × 2 arms ({design}"
              + (f", washout {washout_days:g} days" if design == "crossover" else "") + "); readers read at /study of "
              "`pneumoscan serve --db …`", highlight=False)


@study_app.command("analyse")
def analyse(
    source: Annotated[str, typer.Argument(help=(
        "A study in the results store (its name; --db), or ratings: a CSV (reader, case, treatment, score, truth), "
        "an Iowa .lrc or an iMRMC .imrmc file (told apart by content)."))],
    out: Annotated[Path, typer.Option(help="Folder for study.json, study.md, study.html and the data as "
                                           ".imrmc and .lrc.")],
    covariance: Annotated[str, typer.Option(help="jackknife (the Iowa program's default) or delong.")] = "jackknife",
    alpha: Annotated[float, typer.Option(min=0.001, max=0.5, help="Two-sided level of the tests and intervals.")] = 0.05,
    db: DbOption = None,
    target: Annotated[str | None, typer.Option(help="A study in the store: the target to analyse (default its first).")] = None,
) -> None:
    """Obuchowski–Rockette analysis with Hillis's degrees of freedom (random readers and cases,
    fixed readers, fixed cases) of empirical AUCs, per reader and treatment; for a study in the
    store also the binary calls' sensitivity and specificity, reading times and the model alone."""
    import json

    from pneumoscan.readerstudy.mrmc import analyse as run_analysis
    from pneumoscan.readerstudy.ratings import RatingsError, read_ratings, write_imrmc, write_lrc
    from pneumoscan.readerstudy.report import study_html, study_markdown

    if covariance not in ("jackknife", "delong"):
        fail("--covariance must be jackknife or delong")
    ensure_writable(out, "--out")
    extras = None
    if Path(source).is_file():
        try:
            ratings = read_ratings(source)
        except (RatingsError, ValueError, KeyError, IndexError) as exc:
            fail(f"{source}: {exc}" if str(source) not in str(exc) else str(exc))
    else:
        from pneumoscan.store.study import study_data, study_extras

        if Path(source).exists():
            fail(f"{source}: not a file")
        store = open_store(db, create=False)
        try:
            data = study_data(store, source, target)
        except PneumoScanError as exc:
            fail(f"{exc} (SOURCE is neither a file nor, it seems, a study in {store.where})"
                 if "no study" in str(exc) else str(exc))
        finally:
            store.close()
        ratings, extras = data["ratings"], study_extras(data, alpha)
    try:
        result = run_analysis(ratings, covariance=covariance, alpha=alpha)
    except (RatingsError, ValueError, KeyError, IndexError) as exc:
        fail(f"{source}: {exc}" if str(source) not in str(exc) else str(exc))
    if extras is not None:
        result["study"] = extras
    (out / "study.json").write_text(json.dumps(result, indent=1))
    label = Path(source).name
    (out / "study.md").write_text(study_markdown(result, label))
    (out / "study.html").write_text(study_html(result, ratings, label))
    write_imrmc(ratings, out / "study.imrmc")
    write_lrc(ratings, out / "study.lrc")
    first = result["rrrc"]["pairs"][0]
    console.print(f"{len(ratings.readers)} readers, {len(ratings.treatments)} treatments, {len(ratings.cases)} cases; "
                  f"{first['pair'][0]} − {first['pair'][1]}: AUC difference {first['difference']:+.4f} "
                  f"({first['ci'][0]:+.4f} to {first['ci'][1]:+.4f}), random readers and cases F = {result['rrrc']['F']:.3f}, "
                  f"ddf = {result['rrrc']['ddf']:.2f}, p = {result['rrrc']['p']:.4f}; report in {out / 'study.md'}",
                  highlight=False)
