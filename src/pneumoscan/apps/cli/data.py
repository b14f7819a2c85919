"""``pneumoscan index`` and ``prepare``: the manifest of every source found, and the crop cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from pneumoscan.apps.cli.common import (
    Dir,
    QuietOption,
    app,
    console,
    err,
    fail,
    numbers,
    print_table,
)
from pneumoscan.errors import PneumoScanError


@app.command()
def index(
    out: Annotated[Path, typer.Option(help="Manifest CSV to write.")],
    root: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False,
        help="A folder holding sources under their usual names (nih-cxr14 and nih-cxr14-*, kermany, "
             "rsna-pneumonia, montgomery, shenzhen, covid-chestxray, actualmed-covid, rsna-nih-masked).")] = None,
    nih: Annotated[Optional[list[Path]], typer.Option(
        exists=True, file_okay=False,
        help="NIH ChestX-ray14 folder; repeat for several extracts (patients shared across them).")] = None,
    kermany: Dir = None,
    rsna: Dir = None,
    rsna_mapping: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False,
        help="pneumonia-challenge-dataset-mappings_2018.json (RSNA↔NIH).")] = None,
    montgomery: Dir = None,
    shenzhen: Dir = None,
    covid: Dir = None,
    actualmed: Dir = None,
    nih_masked: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False,
        help="rsna-nih-masked folder (index.csv of lung-masked NIH films).")] = None,
    nih_masked_images: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False,
        help="Snapshot of amitlohan/covid_lungs_dataset that rsna-nih-masked/index.csv points into "
             "(default: $PNEUMOSCAN_NIH_MASKED_IMAGES).")] = None,
    test_source: Annotated[Optional[list[str]], typer.Option(
        help="Pin every image of this source (and of its patients elsewhere) to test; repeatable.")] = None,
    exclude: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False,
        help="Films to leave out before anything trains or chooses on them: a folder with "
             "nih_patient_ids.txt and/or other_file_names.txt (an independent evaluation set's list). "
             "Default: ROOT/holdout-exclude when --root holds one.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the patient-wise split.")] = 2019,
    fractions: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.08,0.12",
    quiet: QuietOption = False,
) -> None:
    """Index data sources in their original layouts into one patient-wise split manifest."""
    from pneumoscan.data import (
        Exclusions,
        build_manifest,
        patient_leaks,
        resolve_sources,
        summarize,
        write_manifest,
    )

    sources: dict = resolve_sources(root) if root else {}
    given = {"nih": nih or None, "kermany": kermany, "rsna": rsna, "montgomery": montgomery,
             "shenzhen": shenzhen, "covid": covid, "actualmed": actualmed, "nihmasked": nih_masked}
    sources.update({k: v for k, v in given.items() if v is not None})
    if not sources:
        fail("no sources given: pass --root DIR or at least one of --nih, --kermany, --rsna, ...")
    train_share, val_share, test_share = numbers(
        fractions, f"--fractions must be three numbers like 0.8,0.08,0.12, got {fractions!r}", 3)
    if exclude is None and root is not None and (root / "holdout-exclude").is_dir():
        exclude = root / "holdout-exclude"
    warnings: list[str] = []
    try:
        exclusions = Exclusions.load(exclude) if exclude is not None else None
        table = build_manifest(sources, fractions=(train_share, val_share, test_share), seed=seed,
                               rsna_mapping=rsna_mapping, nih_masked_images=nih_masked_images, test_sources=test_source or (),
                               warnings=warnings, exclusions=exclusions)
    except PneumoScanError as exc:
        fail(str(exc))
    for line in warnings:
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)
    leaks = patient_leaks(table)
    if leaks:  # cannot happen by construction; checked because a leak would poison every metric
        fail(f"{len(leaks)} patients fall in more than one split, e.g. {leaks[:3]}")
    write_manifest(table, out)
    per_source, per_label = summarize(table)
    print_table("Images (patients) per source and split", per_source)
    print_table("Positive / known labels per split", per_label)
    tell_exclusions(table.attrs.get("excluded") if exclusions is not None else None, exclude)
    console.print(f"wrote {len(table):,} rows to {out}")


def tell_exclusions(lost: dict[str, int] | None, listed_in: Path | None) -> None:
    """How many films each source lost to the exclusion list, or a warning that none was given."""
    if lost is not None:
        console.print(f"left out {sum(lost.values()):,} films listed in {escape(str(listed_in))} ("
                      + ", ".join(f"{s} {n:,}" for s, n in sorted(lost.items())) + ")")
    else:
        err.print("[yellow]warning:[/] no exclusion list (--exclude): if an independent evaluation set "
                  "shares these sources, its films are in this manifest", highlight=False)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        fail(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    if not 0 <= i < n:
        fail(f"--shard i/n needs 0 ≤ i < n, got {text}")
    return i, n


@app.command()
def prepare(
    manifest: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Manifest CSV (pneumoscan index).")],
    out: Annotated[Path, typer.Option(help="Cache folder (created; rerun to resume).")],
    size: Annotated[int, typer.Option(help="Crop side in pixels (the classifier input).")] = 224,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    shard: Annotated[str, typer.Option(help="i/n: this job's share of the shards (cluster arrays).")] = "0/1",
    shard_size: Annotated[int, typer.Option(min=1)] = 128,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model; the shipped one if omitted.")] = None,
    ray: Annotated[Optional[str], typer.Option(
        help="Run the shards on Ray: 'local' (started here) or a cluster address; --workers actors.")] = None,
    lung_mask: Annotated[bool, typer.Option(
        help="Lungs only: 0 outside the lung mask (the input of a lung-masked classifier).")] = False,
    quiet: QuietOption = False,
) -> None:
    """Crop cache: read → CLAHE → segment → crop → resize every manifest image once, in shards."""
    from pneumoscan.data import read_manifest
    from pneumoscan.training.cache import prepare as run_prepare

    runner = None
    if ray is not None:
        from functools import partial

        from pneumoscan.apps.cluster import run_shards

        runner = partial(run_shards, workers=workers, seg_model=str(seg_model) if seg_model else None, address=ray)
    try:
        table = read_manifest(manifest)
        result = run_prepare(table, out, size=size, shard_size=shard_size, workers=workers,
                             shard=parse_shard(shard), seg_model=seg_model, masked=lung_mask, runner=runner)
    except (PneumoScanError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(
        f"{result['shards_done_now']} shards ({result['images_done_now']:,} images) done now, "
        f"{result['errors_now']} unreadable; this job's shards: {result['shards_this_job']} of "
        f"{result['shards_total']}; cache complete: {result['complete']}"
        + (f" (unreadable images listed in {out / 'errors.csv'})" if result["complete"] else ""))
