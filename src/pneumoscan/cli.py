"""The ``pneumoscan`` command: a thin layer over the package's functions (no logic of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="PneumoScan: chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def print_table(title: str, frame) -> None:
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(str(column), justify="left" if frame[column].dtype == object else "right")
    for values in frame.itertuples(index=False):
        table.add_row(*(str(v) for v in values))
    console.print(table)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """PneumoScan: chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM."""
    if version:
        from pneumoscan import __version__

        console.print(f"pneumoscan {__version__}")
        raise typer.Exit()


Dir = Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, dir_okay=True)]


@app.command()
def index(
    out: Annotated[Path, typer.Option(help="Manifest CSV to write.")],
    root: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False,
        help="A folder holding sources under their usual names (nih-cxr14, kermany, "
             "rsna-pneumonia, montgomery, shenzhen, covid-chestxray, actualmed-covid).")] = None,
    nih: Dir = None,
    kermany: Dir = None,
    rsna: Dir = None,
    rsna_mapping: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False,
        help="pneumonia-challenge-dataset-mappings_2018.json (RSNA↔NIH).")] = None,
    montgomery: Dir = None,
    shenzhen: Dir = None,
    covid: Dir = None,
    actualmed: Dir = None,
    seed: Annotated[int, typer.Option(help="Seed of the patient-wise split.")] = 2019,
    fractions: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.08,0.12",
) -> None:
    """Index data sources in their original layouts into one patient-wise split manifest."""
    from pneumoscan.data import (
        ManifestError, build_manifest, patient_leaks, resolve_sources, summarize, write_manifest,
    )

    sources: dict[str, Path] = resolve_sources(root) if root else {}
    given = {"nih": nih, "kermany": kermany, "rsna": rsna, "montgomery": montgomery,
             "shenzhen": shenzhen, "covid": covid, "actualmed": actualmed}
    sources.update({k: v for k, v in given.items() if v is not None})
    if not sources:
        fail("no sources given: pass --root DIR or at least one of --nih, --kermany, --rsna, ...")
    try:
        parts = tuple(float(x) for x in fractions.split(","))
        if len(parts) != 3:
            raise ValueError
    except ValueError:
        fail(f"--fractions must be three numbers like 0.8,0.08,0.12, got {fractions!r}")
    warnings: list[str] = []
    try:
        table = build_manifest(sources, fractions=parts, seed=seed, rsna_mapping=rsna_mapping,
                               warnings=warnings)
    except ManifestError as exc:
        fail(str(exc))
    for line in warnings:
        err.print(f"[yellow]warning:[/] {line}", highlight=False)
    leaks = patient_leaks(table)
    if leaks:  # cannot happen by construction; checked because a leak would poison every metric
        fail(f"{len(leaks)} patients fall in more than one split, e.g. {leaks[:3]}")
    write_manifest(table, out)
    per_source, per_label = summarize(table)
    print_table("Images (patients) per source and split", per_source)
    print_table("Positive / known labels per split", per_label)
    console.print(f"wrote {len(table):,} rows to {out}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
