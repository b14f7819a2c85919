"""Judging and adapting a classifier on a site's films: ``evaluate``, ``compare``, ``calibrate``; and
the two helpers every scoring command shares (:func:`headline`, :func:`scored_or_fail`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar, cast

import typer
from rich.markup import escape

from pneumoscan.apps.cli.common import (
    BackendOption,
    QuietOption,
    app,
    console,
    ensure_writable,
    err,
    fail,
    print_table,
)
from pneumoscan.errors import PneumoScanError

T = TypeVar("T")


def headline(within: dict, split: str, assessed: list[str] | None = None) -> str:
    """One line that cannot be misread: only within-source AUCs of the labels the model assesses,
    with what they cover, and how many labels are left out."""
    shown = {label: v for label, v in within["per_label"].items() if assessed is None or label in assessed}
    parts = [f"{label} {v['auc']:.3f} ({v['images']} images, "
             + ", ".join(f"{s} {w['auc']:.3f}" for s, w in v["sources"].items()) + ")"
             for label, v in shown.items()]
    if not parts:
        return (f"{split}: no assessed label has {within['min_per_class']} positives and negatives inside one "
                f"source, so no AUC is reported (a pooled AUC here would measure the data sets)")
    mean = within["mean_auc_findings"]
    return (f"{split} AUC within sources (≥ {within['min_per_class']} positives and negatives per source), "
            f"{len(parts)} assessed labels: " + "; ".join(parts)
            + (f". Mean over the {len(within['findings_scored'])} assessed findings: {mean:.3f}" if mean is not None
               else ". No assessed finding could be scored within a source"))


def scored_or_fail(job: Callable[[], T]) -> T:
    """Run a job that scores a manifest split (evaluate, compare, calibrate): what a manifest, a
    crop cache or a model file refuses ends in one line, never a traceback."""

    try:
        return job()
    except (PneumoScanError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))


@app.command()
def evaluate(
    manifest: Annotated[Path, typer.Option(exists=True, dir_okay=False)],
    split: Annotated[str, typer.Option(help="Manifest split to score: train, val or test.")],
    out: Annotated[Path, typer.Option(help="Folder for report.md, report.json, roc.png, reliability.png.")],
    model: Annotated[Optional[Path], typer.Option(help="Classifier file; the shipped one if omitted.")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Crop cache to take crops from.")] = None,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model for on-the-fly crops.")] = None,
    n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the AUC CIs.")] = 1000,
    backend: BackendOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Per-class AUC with bootstrap CIs, thresholds, sensitivity/specificity, calibration."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder (it is created if missing)")
    ensure_writable(out, "--out")  # before the models load: a bad --out is answered at once
    from pneumoscan.progress import note
    from pneumoscan.training.evaluate import evaluate_split

    note("evaluate: loading models …")

    report = scored_or_fail(lambda: evaluate_split(manifest, split, out, model=model, cache=cache,
                                                   seg_model=seg_model, n_boot=n_boot, backend=backend))
    console.print(headline(report["within_source"], f"split {split}",
                           [label for label, e in report["per_label"].items() if e["threshold"] is not None]),
                  highlight=False)
    if report.get("dropped"):
        console.print(f"{len(report['dropped'])} films left out (listed in the report)", highlight=False)
    console.print(f"{report['n_images']} images scored; the full report (AUCs per source with CIs, operating points, "
                  f"subgroups, calibration) is {out / 'report.md'} (and report.html)", highlight=False)


@app.command()
def compare(
    models: Annotated[list[Path], typer.Argument(help="Two or more classifier files (with --crossval: crossval run "
                                                      "folders); differences are from the first.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.md and compare.json.")],
    manifest: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Films to score (model files).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Manifest split to score: train, val or test.")] = None,
    crossval: Annotated[bool, typer.Option(
        "--crossval", help="Compare crossval runs on their out-of-fold probabilities (nothing scored again): "
                           "the figures a long run is watched by.")] = False,
    fold: Annotated[Optional[list[int]], typer.Option(
        help="--crossval: only films of this fold (repeat; default every fold), e.g. 0 for a backbone "
             "trained on the others.")] = None,
    opacity_index: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="--crossval: rsna-nih-masked/index.csv adds the radiologists' opacity "
                                          "label.")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Crop cache to take crops from (models of its crop size).")] = None,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model for on-the-fly crops.")] = None,
    n_boot: Annotated[int, typer.Option(min=10, help="Bootstrap resamples of patients (CIs and paired differences).")] = 1000,
    label: Annotated[Optional[list[str]], typer.Option(
        help="Label to compare (repeat; default: every label one of the models assesses).")] = None,
    backend: BackendOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Models on the same films: per label and source, each AUC with its CI and the paired
    bootstrap difference from the first model (patients resampled); or crossval runs out of fold."""
    import json

    if crossval and (manifest or split or cache or seg_model or label):
        fail("--crossval compares the runs' out-of-fold probabilities: --manifest, --split, --cache, --seg-model "
             "and --label do not apply")
    if not crossval and (manifest is None or split is None):
        fail("give --manifest and --split (the films to score), or --crossval with crossval run folders")
    if not crossval and (fold or opacity_index):
        fail("--fold and --opacity-index go with --crossval")
    ensure_writable(out, "--out")  # before the models load
    from pneumoscan.progress import note
    from pneumoscan.training.compare import (
        compare_crossval,
        compare_models,
        crossval_markdown,
        markdown,
    )

    if crossval:
        note("compare: reading the runs' out-of-fold probabilities …")
        result = scored_or_fail(lambda: compare_crossval(models, folds=fold, opacity_index=opacity_index, n_boot=n_boot))
        text = crossval_markdown(result)
    else:
        note("compare: loading models …")
        checked = cast(Path, manifest), cast(str, split)  # both required above without --crossval
        result = scored_or_fail(lambda: compare_models(*checked, models, cache=cache, seg_model=seg_model,
                                                       n_boot=n_boot, backend=backend, labels=label))
        text = markdown(result)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(text)
    console.print(text)
    console.print(f"{result.get('images', result.get('films'))} films; written to {out}")


@app.command()
def calibrate(
    manifest: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Labelled manifest of local films.")],
    split: Annotated[str, typer.Option(help="Its split to choose thresholds on (never the test split).")],
    out: Annotated[Path, typer.Option(help="The new model file (same weights, new thresholds, re-hashed).")],
    model: Annotated[Optional[Path], typer.Option(help="Classifier file; the shipped one if omitted.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Only films of this manifest source (e.g. nih).")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="Highest threshold reaching this sensitivity.")] = None,
    target_specificity: Annotated[Optional[float], typer.Option(help="Lowest threshold reaching this specificity.")] = None,
    youden: Annotated[bool, typer.Option(help="Youden's J (sensitivity + specificity − 1 highest).")] = False,
    cache: Annotated[Optional[Path], typer.Option(help="Crop cache to take crops from.")] = None,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model for on-the-fly crops.")] = None,
    n_boot: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the achieved rates' CIs.")] = 1000,
    prevalence: Annotated[Optional[str], typer.Option(help="The site's prevalence of labels, 'Pneumonia=0.05,Effusion=0.1': "
                                                       "the probabilities are shifted to it.")] = None,
    refit_calibration: Annotated[bool, typer.Option(help="Refit each assessed label's calibration (Platt) on these "
                                                          "films, at their prevalence or --prevalence.")] = False,
    quiet: QuietOption = False,
) -> None:
    """New thresholds for the assessed labels from a labelled local split, in a new model file
    that records where they came from; with --prevalence or --refit-calibration the probabilities
    are calibrated for the site too."""
    from pneumoscan.training.calibrate import calibrate as run_calibrate

    chosen = [m for m, given in (("sensitivity", target_sensitivity), ("specificity", target_specificity),
                                 ("youden", youden or None)) if given is not None]
    if len(chosen) != 1:
        fail("give exactly one of --target-sensitivity S, --target-specificity S, --youden")
    if split == "test":
        fail("the test split chooses nothing: calibrate on a validation split of your own films")
    if out.exists():
        fail(f"{out} exists; choose a new file name (a model file is never overwritten)")
    method = chosen[0]
    target = target_sensitivity if method == "sensitivity" else target_specificity
    shares = parse_prevalence(prevalence)
    result = scored_or_fail(lambda: run_calibrate(manifest, split, out, method=method, model=model, source=source,
                                                  cache=cache, target=target, seg_model=seg_model, n_boot=n_boot,
                                                  prevalence=shares, refit=refit_calibration))
    import pandas as pd

    rows = [{"label": label, "old (raw)": r["old"], "new (raw)": r["new"],
             "as predict shows it": "" if r.get("new_shown") is None else f"{r['new_shown']:.4g}",
             "sensitivity": f"{r['sensitivity']:.3f} ({r['sensitivity_ci'][0]:.3f}–{r['sensitivity_ci'][1]:.3f})"
             if r["changed"] else "", "specificity": f"{r['specificity']:.3f} ({r['specificity_ci'][0]:.3f}–"
             f"{r['specificity_ci'][1]:.3f})" if r["changed"] else "",
             "films (pos/neg)": f"{r['positives']}/{r['negatives']}" if r["changed"] else r["why"]}
            for label, r in result["labels"].items()]
    print_table(f"Thresholds chosen on {result['provenance']['images']} films ({method})", pd.DataFrame(rows))
    for line in result["warnings"]:
        err.print(escape(line), highlight=False)
    console.print(f"model written to {out} (SHA-256 {result['sha256'][:16]}…); its thresholds name this calibration; "
                  f"probabilities calibrated for: {result['calibrated_for'] or 'nothing (raw scores)'}")


def parse_prevalence(text: str | None) -> dict[str, float] | None:
    """``--prevalence 'Pneumonia=0.05,Effusion=0.1'`` → {label: share}; exits with one line on a
    malformed part or an unknown label."""
    if not text:
        return None
    from pneumoscan.prediction import resolve_label

    shares = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            share = float(value)
            label = resolve_label(name)
        except ValueError as exc:
            fail(f"--prevalence {part!r}: give LABEL=SHARE, e.g. Pneumonia=0.05 ({exc})")
        if not 0 < share < 1:
            fail(f"--prevalence {part!r}: the share must lie strictly between 0 and 1")
        shares[label] = share
    return shares
