"""The lung and heart U-Nets: ``train-seg`` and ``eval-seg``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pneumoscan.apps.cli.common import (
    Dir,
    app,
    console,
    err,
    fail,
    print_table,
)
from pneumoscan.errors import PneumoScanError


@app.command("train-seg")
def train_seg(
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, logs, model.pt, report).")],
    montgomery: Dir = None,
    shenzhen: Dir = None,
    jsrt: Dir = None,
    structure: Annotated[str, typer.Option(help="lungs (Montgomery, Shenzhen, JSRT) or heart (JSRT).")] = "lungs",
    folds: Annotated[int, typer.Option(help="Cross-validation: hash folds (0 = one --val-fraction split).")] = 0,
    fold: Annotated[int, typer.Option(help="With --folds: the fold held out for validation.")] = 0,
    schedule: Annotated[str, typer.Option(help="plateau (keep the best validation epoch) or cosine "
                                               "(fixed, keep the last: validation chooses nothing).")] = "plateau",
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
    """Train the lung or heart U-Net (checkpoint every epoch, resumable)."""
    from pneumoscan.segment import PRESETS
    from pneumoscan.training.segment import SegTrainConfig, train_segmentation

    sources = seg_sources(structure, montgomery=montgomery, shenzhen=shenzhen, jsrt=jsrt)
    if folds > 1 and not 0 <= fold < folds:
        fail(f"--fold must be in 0…{folds - 1}")
    if schedule not in ("plateau", "cosine"):
        fail("--schedule must be plateau or cosine")
    if preset not in PRESETS:
        fail(f"--preset must be one of {PRESETS}")
    if size % 16:
        fail("--size must be a multiple of 16 (the U-Net halves it four times)")
    from pneumoscan.modelfile import ModelFileError

    try:
        meta = train_segmentation(SegTrainConfig(
            out=out, sources=sources, preset=preset, size=size, epochs=epochs, batch_size=batch_size,
            lr=lr, seed=seed, val_fraction=val_fraction, accelerator=accelerator, devices=devices,
            resume=resume, structure=structure, folds=folds, fold=fold, schedule=schedule))
    except ModelFileError as exc:
        fail(str(exc))
    console.print((out / "report.md").read_text())
    console.print(f"model written to {out / 'model.pt'} (weights SHA-256 {meta['weights_sha256'][:16]}…)")


@app.command("eval-seg")
def eval_seg(
    montgomery: Dir = None,
    shenzhen: Dir = None,
    jsrt: Dir = None,
    model: Annotated[Optional[Path], typer.Option(help="Lung model file; the shipped one if omitted.")] = None,
    heart_model: Annotated[Optional[Path], typer.Option(help="Heart model file; the shipped one if omitted.")] = None,
) -> None:
    """Dice / IoU / pixel accuracy of the lung model (and, with --jsrt, the heart model) on every
    masked image of the given sources."""
    import pandas as pd

    from pneumoscan.segment import (
        HeartSegmenter,
        LungSegmenter,
        load_default,
        load_default_heart,
    )
    from pneumoscan.training.segment import evaluate_segmentation, segmentation_table

    lung_sources = seg_sources("lungs", montgomery=montgomery, shenzhen=shenzhen, jsrt=jsrt)
    try:
        segmenter = LungSegmenter.load(model) if model else load_default()
        heart = (HeartSegmenter.load(heart_model) if heart_model else load_default_heart()) if jsrt else None
    except (PneumoScanError, FileNotFoundError) as exc:
        fail(str(exc))
    for title, model_, sources, structure in (("Lung", segmenter, lung_sources, "lungs"),
                                              ("Heart", heart, {"jsrt": str(jsrt)}, "heart")):
        if model_ is None:
            continue
        metrics = evaluate_segmentation(model_, segmentation_table(sources, val_fraction=0.0, structure=structure))
        print_table(f"{title} segmentation (all masked images)", pd.DataFrame(metrics).T.reset_index(names="source"))
        seen = sorted(set(sources) & set(model_.meta.get("training_data") or {}))
        if seen:  # a figure on training films says little about new ones
            err.print(f"[yellow]note:[/] the {title.lower()} model learnt from {', '.join(seen)}: these figures "
                      "are on films it was trained or validated on, not on unseen films")


def seg_sources(structure: str, **given: Optional[Path]) -> dict[str, str]:
    """The segmentation sources given on the command line that have masks of ``structure``."""
    if structure not in ("lungs", "heart"):
        fail("--structure must be lungs or heart")
    allowed = ("jsrt",) if structure == "heart" else ("montgomery", "shenzhen", "jsrt")
    sources = {k: str(v) for k, v in given.items() if v and k in allowed}
    if not sources:
        fail(f"{structure} masks come from " + " and/or ".join(f"--{k} DIR" for k in allowed))
    return sources
