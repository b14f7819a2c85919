"""Reader studies: ``pneumoscan study analyse`` (the Obuchowski–Rockette–Hillis analysis of
:mod:`pneumoscan.mrmc` on a ratings CSV, an Iowa ``.lrc`` or an iMRMC ``.imrmc`` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumoscan.apps.cli.common import app, console, ensure_writable, fail

study_app = typer.Typer(help="Reader studies: readers with and without PneumoScan (MRMC analysis).",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("analyse")
def analyse(
    source: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                           help="Ratings: a CSV (reader, case, treatment, score, truth), an Iowa "
                                                ".lrc or an iMRMC .imrmc file (told apart by content).")],
    out: Annotated[Path, typer.Option(help="Folder for study.json, study.md, study.html and the data as "
                                           ".imrmc and .lrc.")],
    covariance: Annotated[str, typer.Option(help="jackknife (the Iowa program's default) or delong.")] = "jackknife",
    alpha: Annotated[float, typer.Option(min=0.001, max=0.5, help="Two-sided level of the tests and intervals.")] = 0.05,
) -> None:
    """Obuchowski–Rockette analysis with Hillis's degrees of freedom (random readers and cases,
    fixed readers, fixed cases) of empirical AUCs, per reader and treatment."""
    import json

    from pneumoscan.mrmc import RatingsError, read_ratings, write_imrmc, write_lrc
    from pneumoscan.mrmc import analyse as run_analysis
    from pneumoscan.mrmc_report import study_html, study_markdown

    if covariance not in ("jackknife", "delong"):
        fail("--covariance must be jackknife or delong")
    ensure_writable(out, "--out")
    try:
        ratings = read_ratings(source)
        result = run_analysis(ratings, covariance=covariance, alpha=alpha)
    except (RatingsError, ValueError, KeyError, IndexError) as exc:
        fail(f"{source}: {exc}" if str(source) not in str(exc) else str(exc))
    (out / "study.json").write_text(json.dumps(result, indent=1))
    (out / "study.md").write_text(study_markdown(result, source.name))
    (out / "study.html").write_text(study_html(result, ratings, source.name))
    write_imrmc(ratings, out / "study.imrmc")
    write_lrc(ratings, out / "study.lrc")
    first = result["rrrc"]["pairs"][0]
    console.print(f"{len(ratings.readers)} readers, {len(ratings.treatments)} treatments, {len(ratings.cases)} cases; "
                  f"{first['pair'][0]} − {first['pair'][1]}: AUC difference {first['difference']:+.4f} "
                  f"({first['ci'][0]:+.4f} to {first['ci'][1]:+.4f}), random readers and cases F = {result['rrrc']['F']:.3f}, "
                  f"ddf = {result['rrrc']['ddf']:.2f}, p = {result['rrrc']['p']:.4f}; report in {out / 'study.md'}",
                  highlight=False)
