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


@app.command("train-seg")
def train_seg(
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, logs, model.pt, report).")],
    montgomery: Dir = None,
    shenzhen: Dir = None,
    preset: Annotated[str, typer.Option(help="U-Net width: small (1.6 M) or thesis (31 M).")] = "small",
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 224,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 40,
    batch_size: Annotated[int, typer.Option()] = 16,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option()] = 2019,
    val_fraction: Annotated[float, typer.Option()] = 0.2,
    accelerator: Annotated[str, typer.Option(help="auto, cpu or gpu.")] = "auto",
    devices: Annotated[int, typer.Option()] = 1,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt if present.")] = True,
) -> None:
    """Train the lung U-Net on Montgomery and/or Shenzhen (checkpoint every epoch, resumable)."""
    from pneumoscan.segment import PRESETS
    from pneumoscan.segment_train import SegTrainConfig, train_segmentation

    sources = {k: str(v) for k, v in {"montgomery": montgomery, "shenzhen": shenzhen}.items() if v}
    if not sources:
        fail("give --montgomery DIR and/or --shenzhen DIR")
    if preset not in PRESETS:
        fail(f"--preset must be one of {PRESETS}")
    if size % 16:
        fail("--size must be a multiple of 16 (the U-Net halves it four times)")
    meta = train_segmentation(SegTrainConfig(
        out=out, sources=sources, preset=preset, size=size, epochs=epochs, batch_size=batch_size,
        lr=lr, seed=seed, val_fraction=val_fraction, accelerator=accelerator, devices=devices,
        resume=resume))
    console.print((out / "report.md").read_text())
    console.print(f"model written to {out / 'model.pt'} (weights SHA-256 {meta['weights_sha256'][:16]}…)")


@app.command("eval-seg")
def eval_seg(
    montgomery: Dir = None,
    shenzhen: Dir = None,
    model: Annotated[Optional[Path], typer.Option(help="Model file; the shipped one if omitted.")] = None,
) -> None:
    """Dice / IoU / pixel accuracy of a lung model on every masked image of the given sources."""
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.segment import LungSegmenter, load_default
    from pneumoscan.segment_train import evaluate_segmentation, segmentation_table

    sources = {k: str(v) for k, v in {"montgomery": montgomery, "shenzhen": shenzhen}.items() if v}
    if not sources:
        fail("give --montgomery DIR and/or --shenzhen DIR")
    try:
        segmenter = LungSegmenter.load(model) if model else load_default()
    except (ModelFileError, FileNotFoundError) as exc:
        fail(str(exc))
    table = segmentation_table(sources, val_fraction=0.0)
    metrics = evaluate_segmentation(segmenter, table)
    import pandas as pd

    print_table("Lung segmentation (all masked images)", pd.DataFrame(metrics).T.reset_index(names="source"))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for PNG, JPEG and DICOM files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found


def output_stem(path: Path, used: set[str]) -> str:
    """NAME for NAME.ext, made unique (NAME-2, ...) when two inputs share a file name."""
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}-{n}"
    used.add(stem)
    return stem


@app.command()
def segment(
    images: Annotated[list[Path], typer.Argument(help="X-ray files or folders (PNG, JPEG, DICOM).")],
    out: Annotated[Path, typer.Option(help="Folder for masks, overlays and segment.jsonl.")],
    model: Annotated[Optional[Path], typer.Option(help="Lung model file; the shipped one if omitted.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Lung mask, overlay and crop box for each X-ray; unreadable files are reported, not fatal."""
    import json

    import cv2
    from tqdm import tqdm

    from pneumoscan.io import XrayReadError, read_xray
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.overlay import segmentation_overlay
    from pneumoscan.segment import LungSegmenter, load_default

    try:
        segmenter = LungSegmenter.load(model) if model else load_default()
    except (ModelFileError, FileNotFoundError) as exc:
        fail(str(exc))
    paths = expand_inputs(images)
    if not paths:
        fail("no PNG, JPEG or DICOM files found in the given paths")
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    failures = 0
    with open(out / "segment.jsonl", "w") as log, tqdm(total=len(paths), unit="img", desc="segment") as bar:
        for start in range(0, len(paths), batch_size):
            chunk, pixels, records = paths[start:start + batch_size], [], []
            for path in chunk:
                record = {"path": str(path), "box": None, "lung_fraction": None, "fallback": None,
                          "error": None}
                try:
                    pixels.append(read_xray(path).pixels)
                except XrayReadError as exc:
                    record["error"] = str(exc)
                    failures += 1
                records.append(record)
            results = iter(segmenter.segment_batch(pixels)) if pixels else iter(())
            images_iter = iter(pixels)
            for path, record in zip(chunk, records):
                if record["error"] is None:
                    seg, picture = next(results), next(images_iter)
                    stem = output_stem(path, used)
                    cv2.imwrite(str(out / f"{stem}_mask.png"), seg.mask * 255)
                    cv2.imwrite(str(out / f"{stem}_overlay.png"),
                                segmentation_overlay(picture, seg.mask, seg.box, seg.fallback))
                    record.update(box=list(seg.box), lung_fraction=round(seg.lung_fraction, 4),
                                  fallback=seg.fallback, mask=f"{stem}_mask.png",
                                  overlay=f"{stem}_overlay.png")
                else:
                    err.print(f"[yellow]skipped:[/] {record['error']}", highlight=False)
                log.write(json.dumps(record) + "\n")
                bar.update(1)
    done = len(paths) - failures
    console.print(f"segmented {done} of {len(paths)} images → {out / 'segment.jsonl'}")
    if failures:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
