"""The ``pneumoscan`` command: a thin layer over the package's functions (no logic of its own)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="PneumoScan: chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # one message, one line: greppable, never re-wrapped


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def print_table(title: str, frame) -> None:
    """A rich table on a terminal; plain aligned text in logs and pipes (never truncated)."""
    if not console.is_terminal:
        console.print(f"{title}\n{frame.to_string(index=False)}", highlight=False)
        return
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(str(column), justify="left" if frame[column].dtype == object else "right")
    for values in frame.itertuples(index=False):
        table.add_row(*(str(v) for v in values))
    console.print(table)


def need_extra(extra: str, what: str, *modules: str) -> None:
    """A one-line usage error naming the extra to install when one of ``modules`` is missing."""
    from importlib.util import find_spec

    if any(find_spec(module) is None for module in modules):
        fail(f"{what} needs the {extra} extra: pip install 'pneumoscan[{extra}]'")


BackendOption = Annotated[str, typer.Option(
    help="auto (ONNX Runtime on the CPU when installed, exported once per model pair into the user "
         "cache; else PyTorch), onnx or torch.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, or cuda[:N] for a GPU (PyTorch backend).")]


def _print_version(value: bool) -> None:
    """``--version``: answered before any command is required (an eager option)."""
    if value:
        from pneumoscan import __version__

        console.print(f"pneumoscan {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """PneumoScan: chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM."""


Dir = Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, dir_okay=True)]


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
    seed: Annotated[int, typer.Option(help="Seed of the patient-wise split.")] = 2019,
    fractions: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.08,0.12",
) -> None:
    """Index data sources in their original layouts into one patient-wise split manifest."""
    from pneumoscan.data import (
        ManifestError,
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
    try:
        parts = tuple(float(x) for x in fractions.split(","))
        if len(parts) != 3:
            raise ValueError
    except ValueError:
        fail(f"--fractions must be three numbers like 0.8,0.08,0.12, got {fractions!r}")
    warnings: list[str] = []
    try:
        table = build_manifest(sources, fractions=parts, seed=seed, rsna_mapping=rsna_mapping,
                               nih_masked_images=nih_masked_images, test_sources=test_source or (),
                               warnings=warnings)
    except ManifestError as exc:
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
    console.print(f"wrote {len(table):,} rows to {out}")


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

    from pneumoscan.modelfile import ModelFileError
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
    except (ModelFileError, FileNotFoundError) as exc:
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


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def is_regular(path: Path) -> bool:
    """Only regular files are read: a FIFO or device named x.png would block or never end."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def expand_inputs(paths: list[Path], skip: Path | None = None) -> list[Path]:
    """Files as given; folders searched recursively for PNG, JPEG and DICOM files (by extension,
    or by the DICOM magic for files without one), leaving out the folder ``skip`` (the run's own
    output: its overlays are not films). Anything but a regular file is skipped, said."""
    from pneumoscan.io import display_name, is_dicom_file

    found: list[Path] = []
    skip = skip.resolve() if skip is not None else None
    for path in paths:
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        if path.is_dir() and skip is not None:
            candidates = [p for p in candidates if not p.resolve().is_relative_to(skip)]
        for p in candidates:
            if not p.exists():
                found.append(p)  # reported per file as unreadable, the batch goes on
            elif not is_regular(p):
                if not p.is_dir():
                    err.print(f"[yellow]skipped:[/] {escape(display_name(p))}: not a regular file", highlight=False)
            elif path.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES and not (
                    p.suffix.lower() in ("", ".dicom", ".ima") and is_dicom_file(p)):
                continue
            else:
                found.append(p)
    return found


def gather_inputs(paths: list[Path], out: Path) -> list[Path]:
    """The image files to process (or a clean exit when there are none) and a ready output folder."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder (it is created if missing)")
    files = expand_inputs(paths, skip=out)
    if not files:
        fail("no PNG, JPEG or DICOM files found in the given paths")
    ensure_writable(out, "--out")
    return files


def ensure_writable(folder: Path, option: str) -> None:
    """Create ``folder`` and prove it takes a byte (read-only mounts, full disks and permissions
    all show here, before any film is read), else a one-line usage error."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as exc:
        fail(f"cannot write to {option} {folder}: {exc.strerror or exc}")


def stopped_writing(exc: OSError, counts: dict, total: int, outputs) -> None:
    """A full or read-only output folder: one line saying what was kept, exit 1."""
    fail(f"cannot write to {exc.filename or outputs.out}: {exc.strerror or exc}; stopped after {counts['written']} of {total} images, "
         f"whose records are in {outputs.target}; make room and run again", 1)


@app.command()
def segment(
    images: Annotated[list[Path], typer.Argument(help="X-ray files or folders (PNG, JPEG, DICOM).")],
    out: Annotated[Path, typer.Option(help="Folder for masks, overlays and segment.jsonl.")],
    model: Annotated[Optional[Path], typer.Option(help="Lung model file; the shipped one if omitted.")] = None,
    heart_model: Annotated[Optional[Path], typer.Option(help="Heart model file; the shipped one if omitted.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Lung mask (NAME_mask.png), heart mask (NAME_heart.png), overlay and crop box for each X-ray,
    with the cardiothoracic ratio; unreadable files are reported, not fatal."""
    import json

    import cv2
    import numpy as np
    from tqdm import tqdm

    from pneumoscan.crop import read_segment_crop
    from pneumoscan.io import display_name
    from pneumoscan.measure import cardiothoracic_ratio
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.outputs.overlay import segmentation_overlay
    from pneumoscan.predict import load_heart
    from pneumoscan.segment import LungSegmenter, load_default

    try:
        segmenter = LungSegmenter.load(model) if model else load_default()
        heart_segmenter = load_heart(heart_model)
    except (ModelFileError, FileNotFoundError) as exc:
        fail(str(exc))
    if heart_segmenter is None:
        fail("no heart model is installed; give --heart-model FILE")
    from pneumoscan.outputs.writer import output_stems

    paths = gather_inputs(images, out)
    stems = iter(output_stems(paths))
    failures = 0
    with open(out / "segment.jsonl", "w") as log, tqdm(total=len(paths), unit="img", desc="segment") as bar:
        # The crop itself is not needed here; it is the shared path's by-product (a resize).
        for chunk in read_segment_crop(paths, segmenter, 8, batch=batch_size, threads=2):
            readable = [item for item in chunk if item.seg is not None]
            hearts = iter(heart_segmenter.heart_masks(  # in chunk order, one per readable film
                [item.image.pixels for item in readable],
                np.stack([item.prepared for item in readable]) if readable else None))
            for item in chunk:
                record = {"path": display_name(item.source), "box": None, "lung_fraction": None, "fallback": None,
                          "cardiothoracic_ratio": None, "error": item.error}
                seg, stem = item.seg, next(stems)
                if seg is not None:
                    heart = next(hearts)
                    ctr = cardiothoracic_ratio(seg.mask, heart, item.image.meta.get("view_position"),
                                               lungs_found=not seg.fallback)
                    record.update(box=list(seg.box), lung_fraction=round(seg.lung_fraction, 4),
                                  fallback=seg.fallback, cardiothoracic_ratio=ctr.value,
                                  cardiothoracic_ratio_reason=ctr.reason)
                    try:  # a file is listed only once it is written
                        for kind, image in (("mask", seg.mask * 255), ("heart", heart * 255), ("overlay", segmentation_overlay(
                                item.image.pixels, seg.mask, seg.box, seg.fallback, heart))):
                            if not cv2.imwrite(str(out / f"{stem}_{kind}.png"), image):
                                raise OSError(f"could not write {stem}_{kind}.png")
                            record[kind] = f"{stem}_{kind}.png"
                    except (OSError, cv2.error) as exc:
                        record["error"] = f"{item.source}: output not written ({exc})"
                if record["error"] is not None:
                    failures += 1
                    err.print(f"[yellow]skipped:[/] {escape(record['error'])}", highlight=False)
                log.write(json.dumps(record) + "\n")
                bar.update(1)
    done = len(paths) - failures
    console.print(f"segmented {done} of {len(paths)} images → {out / 'segment.jsonl'}")
    if failures:
        raise typer.Exit(1)


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
) -> None:
    """Crop cache: read → CLAHE → segment → crop → resize every manifest image once, in shards."""
    from pneumoscan.apps.cluster import ClusterError
    from pneumoscan.data import ManifestError, read_manifest
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.training.cache import CacheError
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
    except (CacheError, ManifestError, ModelFileError, FileNotFoundError, ClusterError) as exc:
        fail(str(exc))
    console.print(
        f"{result['shards_done_now']} shards ({result['images_done_now']:,} images) done now, "
        f"{result['errors_now']} unreadable; this job's shards: {result['shards_this_job']} of "
        f"{result['shards_total']}; cache complete: {result['complete']}"
        + (f" (unreadable images listed in {out / 'errors.csv'})" if result["complete"] else ""))


@app.command()
def train(
    cache: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Crop cache (pneumoscan prepare).")],
    out: Annotated[Path, typer.Option(help="Run folder: config, logs/metrics.csv, checkpoints, model.pt.")],
    init: Annotated[str, typer.Option(help="imagenet, random, or a PneumoScan classifier file.")] = "imagenet",
    weights: Annotated[Optional[Path], typer.Option(help="ImageNet densenet121-a639ec97.pth file.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 150,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option()] = 1e-3,
    betas: Annotated[str, typer.Option(help="Adam betas; the thesis printed 0.99,0.9.")] = "0.9,0.999",
    patience: Annotated[int, typer.Option(help="Epochs without val-loss gain before LR × 0.1.")] = 8,
    early_stop: Annotated[int, typer.Option(help="Stop after N epochs without gain (0 = never).")] = 0,
    max_minutes: Annotated[float, typer.Option(help="Stop cleanly after this many minutes (0 = no limit).")] = 0.0,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader workers per process.")] = 2,
    accelerator: Annotated[str, typer.Option(help="auto, cpu or gpu.")] = "auto",
    devices: Annotated[int, typer.Option(min=1, help="Processes/GPUs per node (DDP when > 1).")] = 1,
    num_nodes: Annotated[int, typer.Option(min=1, help="Machines (Lightning reads the launcher's environment; "
                                                       "docs/MULTINODE.md).")] = 1,
    strategy: Annotated[str, typer.Option(help="auto (DDP when devices × nodes > 1), ddp or fsdp.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16-mixed on GPU), 32-true, 16-mixed, ...")] = "auto",
    seed: Annotated[int, typer.Option()] = 2019,
    all_views: Annotated[bool, typer.Option(help="Also train on lateral views.")] = False,
    source_balance: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Inside adult and inside paediatric films: a source's share "
                               "∝ its size to this power (0 = sources equal, 1 = as indexed).")] = 0.5,
    adult_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of draws from adult films; the rest from paediatric ones.")] = 0.5,
    epoch_size: Annotated[int, typer.Option(min=0, help="Images drawn per epoch (0 = training-set size).")] = 0,
    min_positives: Annotated[int, typer.Option(
        min=0, help="Leave labels with fewer training positives out of the loss.")] = 50,
    freeze_backbone: Annotated[bool, typer.Option(
        help="Train the head only on frozen DenseNet features (first stage of linear-probe-then-fine-tune).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.ckpt (with --freeze-backbone: OUT/head_state*.pt) if present.")] = True,
    arch: Annotated[str, typer.Option(
        help="densenet121 (the thesis's) or agcnn (+ a local branch on the attention box, cut from the "
             "original image; trains stage-wise with --freeze-backbone).")] = "densenet121",
    clinical: Annotated[Optional[str], typer.Option(
        help="Patient information fused with the image: manifest columns, e.g. age,sex,view (each with a "
             "learnt 'missing' value; needs --freeze-backbone).")] = None,
    attention_threshold: Annotated[Optional[list[float]], typer.Option(
        help="AG-CNN attention threshold(s) in (0, 1); several: the best on validation is kept.")] = None,
    description: Annotated[str, typer.Option(help="Training-data description for the model card.")] = "",
    train_from: Annotated[Optional[str], typer.Option(
        help="Fine-tune from this block on (denseblock3 or denseblock4) with the earlier layers frozen and "
             "their output computed once: about 20 images/s on 2 CPU cores instead of 3 for every layer.")] = None,
    select: Annotated[str, typer.Option(
        help="Labels whose mean within-source validation AUC picks the checkpoint: comma-separated names, "
             "or 'all' (every label that reaches the loss).")] = "Pneumonia",
    view_balance: Annotated[bool, typer.Option(
        help="Weigh the loss so that no label follows the view position (AP/PA) inside a source.")] = False,
) -> None:
    """Train the DenseNet-121 classifier on a crop cache (checkpoint every epoch, resumable)."""
    from pneumoscan.classify import PretrainedWeightsError
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.training.cache import CacheError
    from pneumoscan.training.classify import TrainConfig, train_classifier

    try:
        beta_pair = tuple(float(b) for b in betas.split(","))
        assert len(beta_pair) == 2 and all(0 <= b < 1 for b in beta_pair)
    except (ValueError, AssertionError):
        fail(f"--betas must be two numbers in [0, 1) like 0.9,0.999, got {betas!r}")
    if init not in ("imagenet", "random") and not Path(init).is_file():
        fail(f"--init must be imagenet, random or an existing model file, got {init!r}")
    if strategy not in ("auto", "ddp", "fsdp"):
        fail(f"--strategy must be auto, ddp or fsdp, got {strategy!r}")
    from pneumoscan.classify import ARCHS
    from pneumoscan.clinical import ClinicalError, parse_fields
    from pneumoscan.crop import ATTENTION_THRESHOLD

    if arch not in ARCHS:
        fail(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    from pneumoscan.training.classify import TRAIN_FROM

    if train_from is not None and train_from not in TRAIN_FROM:
        fail(f"--train-from must be one of {', '.join(TRAIN_FROM)}, got {train_from!r}")
    if train_from is not None and freeze_backbone:
        fail("--train-from and --freeze-backbone exclude each other (the first trains the last blocks, "
             "the second the head alone)")
    thresholds = tuple(attention_threshold or (ATTENTION_THRESHOLD,))
    if not all(0 < t < 1 for t in thresholds):
        fail(f"--attention-threshold must be in (0, 1), got {list(thresholds)}")
    try:
        fields = tuple(parse_fields(clinical)) if clinical is not None else ()
    except ClinicalError as exc:
        fail(str(exc))
    cfg = TrainConfig(cache=str(cache), out=str(out), init=init, weights=str(weights) if weights else None,
                      epochs=epochs, batch_size=batch_size, lr=lr, betas=beta_pair, patience=patience,
                      early_stop=early_stop, seed=seed, workers=workers, accelerator=accelerator,
                      devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
                      frontal_only=not all_views, resume=resume, description=description,
                      max_minutes=max_minutes, source_balance=source_balance, epoch_size=epoch_size,
                      adult_share=adult_share, freeze_backbone=freeze_backbone,
                      min_positives=min_positives, arch=arch, clinical=fields, attention_thresholds=thresholds,
                      train_from=train_from or "", select=select, view_balance=view_balance)
    try:
        meta = train_classifier(cfg)
    except (PretrainedWeightsError, CacheError, ModelFileError, ClinicalError, ValueError) as exc:
        fail(str(exc))
    if meta is not None:
        console.print(f"model written to {out / 'model.pt'}")
        assessed = [label for label, a in meta["assessment"].items() if a["assessed"]]
        console.print(headline(meta["validation"]["within_source"], "validation", assessed), highlight=False)
        console.print(f"assessed labels ({len(assessed)} of 15): {', '.join(assessed) or 'none'}; the "
                      f"others are reported as 'not assessed' (reasons in the model's metadata)",
                      highlight=False)


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
) -> None:
    """Per-class AUC with bootstrap CIs, thresholds, sensitivity/specificity, calibration."""
    from pneumoscan.data import ManifestError
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.training.cache import CacheError
    from pneumoscan.training.evaluate import evaluate_split

    try:
        report = evaluate_split(manifest, split, out, model=model, cache=cache, seg_model=seg_model,
                                n_boot=n_boot, backend=backend)
    except (CacheError, ManifestError, ModelFileError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    console.print((out / "report.md").read_text())
    console.print(f"{report['n_images']} images scored; reports in {out}")


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
) -> None:
    """New thresholds for the assessed labels from a labelled local split, in a new model file
    that records where they came from."""
    from pneumoscan.data import ManifestError
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.training.cache import CacheError
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
    try:
        result = run_calibrate(manifest, split, out, method=method, model=model, source=source, cache=cache,
                               target=target_sensitivity if method == "sensitivity" else target_specificity,
                               seg_model=seg_model, n_boot=n_boot)
    except (CacheError, ManifestError, ModelFileError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    import pandas as pd

    rows = [{"label": label, "old": r["old"], "new": r["new"],
             "sensitivity": f"{r['sensitivity']:.3f} ({r['sensitivity_ci'][0]:.3f}–{r['sensitivity_ci'][1]:.3f})"
             if r["changed"] else "", "specificity": f"{r['specificity']:.3f} ({r['specificity_ci'][0]:.3f}–"
             f"{r['specificity_ci'][1]:.3f})" if r["changed"] else "",
             "films (pos/neg)": f"{r['positives']}/{r['negatives']}" if r["changed"] else r["why"]}
            for label, r in result["labels"].items()]
    print_table(f"Thresholds chosen on {result['provenance']['images']} films ({method})", pd.DataFrame(rows))
    console.print(f"model written to {out} (SHA-256 {result['sha256'][:16]}…); its thresholds name this calibration")


def load_predictor(seg_model: Path | None, model: Path | None, *, backend: str, device: str,
                   allow_model_mismatch: bool, onnx: Path | None = None):
    """The one Predictor the commands share; a clear one-line error for anything that stops it."""
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.predict import Predictor

    def told(message: str) -> None:
        err.print(escape(message), highlight=False)

    try:
        if onnx:
            return Predictor.from_onnx(onnx, allow_model_mismatch=allow_model_mismatch)
        return Predictor.from_paths(seg_model, model, allow_model_mismatch=allow_model_mismatch,
                                    backend=backend, device=device, progress=told)
    except (ModelFileError, FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc))


def clinical_values(predictor, csv_path: Path | None, files: list[Path]) -> list[dict] | None:
    """Per input, the patient information ``--clinical-csv`` gives for it (matched by file name);
    None when there is no CSV. A model without clinical fields refuses a CSV it would ignore."""
    from pneumoscan.clinical import ClinicalError, read_clinical_csv

    if csv_path is None:
        return None
    spec = predictor.classifier.clinical
    if spec is None:
        fail("--clinical-csv was given, but this model does not use patient information")
    try:
        table = read_clinical_csv(csv_path, spec.names)
    except ClinicalError as exc:
        fail(str(exc))
    missing = sum(1 for f in files if f.name not in table)
    if missing:
        err.print(f"[yellow]note:[/] {missing} of {len(files)} images have no row in {csv_path}: their fields "
                  f"come from DICOM tags where there are any, else count as missing", highlight=False)
    return [table.get(f.name) for f in files]


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="X-ray files or folders (PNG, JPEG, DICOM).")],
    out: Annotated[Path, typer.Option(help="Folder for predictions and overlays.")] = Path("pneumoscan-out"),
    cam: Annotated[Optional[str], typer.Option(help="Grad-CAM class: 'top' (most probable finding) or a class name.")] = "top",
    fmt: Annotated[str, typer.Option("--format", help="json (predictions.jsonl) or csv (predictions.csv).")] = "json",
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
    onnx: Annotated[Optional[Path], typer.Option(help="Run through ONNX Runtime from this export folder.")] = None,
    backend: BackendOption = "auto",
    device: DeviceOption = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    read_threads: Annotated[int, typer.Option(
        min=0, help="Threads decoding files ahead of the models (on a GPU machine: about the CPU cores).")] = 2,
    dicom_out: Annotated[Optional[Path], typer.Option(
        help="Folder for DICOM results of DICOM inputs: SR (findings), SEG (lungs), Secondary Capture (overlay).")] = None,
    ray: Annotated[Optional[str], typer.Option(
        help="Run on Ray: 'local' (started here) or a cluster address; writes predictions.jsonl only, "
             "resumable (files already in it are skipped).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --ray: predictor actors (one model copy each).")] = 2,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="With --ray: GPUs per actor.")] = 0.0,
    overlays: Annotated[bool, typer.Option(help="Write NAME_overlay.png per image.")] = True,
    allow_model_mismatch: Annotated[bool, typer.Option(
        help="Run even if the classifier was trained on another lung model's crops.")] = False,
    force: Annotated[bool, typer.Option(
        help="Score images the input gate refuses as not frontal chest X-rays (marked in 'quality').")] = False,
    clinical_csv: Annotated[Optional[Path], typer.Option(
        help="Patient information for a model that fuses it: a CSV with a 'file' column (image file names) "
             "and the model's fields (e.g. age, sex, view); DICOM tags fill what it lacks.")] = None,
) -> None:
    """Findings, probabilities, lung box and Grad-CAM overlay for each X-ray.

    Images that do not look like a frontal chest X-ray are not scored: their record says why
    (quality.reasons) unless --force is given."""
    from tqdm import tqdm

    from pneumoscan.outputs.writer import (
        FORMATS,
        NoRoom,
        Outputs,
        RecordSink,
        output_stems,
        write_files,
    )

    if fmt not in FORMATS:
        fail("--format must be json or csv")
    if dicom_out:
        need_extra("dicom", "--dicom-out", "highdicom")
        ensure_writable(dicom_out, "--dicom-out")
    predictor = load_predictor(seg_model, model, backend=backend, device=device,
                               allow_model_mismatch=allow_model_mismatch, onnx=onnx)
    try:
        cam = predictor.cam_class(cam)
    except ValueError as exc:
        fail(str(exc))
    files = gather_inputs(paths, out)
    given = clinical_values(predictor, clinical_csv, files)
    outputs = Outputs(out=out, fmt=fmt, overlays=overlays, dicom_out=dicom_out)
    if ray is not None and given is not None:
        fail("--clinical-csv is not taken by --ray yet; run without --ray (DICOM tags are read either way)")
    run = {"models": {k: v for k, v in predictor.models.items() if k != "backend"}, "force": force}
    if ray is not None:
        return predict_on_ray(files, outputs, run, ray=ray, workers=workers, gpus=gpus_per_worker,
                              seg_model=seg_model, model=model, backend=backend, device=device,
                              batch_size=batch_size)
    with RecordSink(outputs, run=run) as sink, tqdm(total=len(files), unit="img", desc="predict") as bar:
        results = predictor.predict_many(files, cam=cam, keep_arrays=outputs.needs_arrays, force=force,
                                         batch_size=batch_size, threads=read_threads, clinical=given)
        try:
            for path, stem, result in zip(files, output_stems(files), results):
                try:
                    record, full = write_files(result, path, stem, outputs, predictor), None
                except NoRoom as exc:  # keep this film's record (its file error said), then stop
                    record, full = exc.record, exc
                sink.write(record)
                tell(record, force)
                bar.update(1)
                if full:
                    raise full
        except OSError as exc:
            bar.close()
            stopped_writing(exc, sink.counts, len(files), outputs)
    finish(sink.counts, len(files), outputs, force)


def tell(record: dict, force: bool) -> None:
    """One line on stderr for a record that failed, was refused, or lost a file."""
    quality = record.get("quality") or {}
    path = escape(str(record["path"]))
    if record.get("error"):
        err.print(f"[yellow]failed:[/] {escape(record['error'])}", highlight=False)
    elif not quality.get("frontal_chest"):
        verb = "scored anyway (--force)" if force else "refused"
        err.print(f"[yellow]{verb}:[/] {path}: not a frontal chest X-ray: "
                  f"{escape('; '.join(quality.get('reasons', [])))}", highlight=False)
    for key in ("overlay_error", "dicom_error"):
        if record.get(key):
            err.print(f"[yellow]failed:[/] {path}: {escape(record[key])}", highlight=False)


def finish(counts: dict, total: int, outputs, force: bool, skipped: int = 0) -> None:
    """The closing lines of ``predict`` (either way of running it) and its exit code."""
    failures = counts["errors"] + counts["failed_files"]
    console.print(f"{counts['written'] - failures} of {total - skipped} images → {outputs.target}"
                  + (f" ({skipped} already there, skipped)" if skipped else "")
                  + (f" (overlays in {outputs.out})" if outputs.overlays else "")
                  + (f"; {counts['refused']} not frontal chest X-rays "
                     f"({'scored anyway' if force else 'not scored; --force scores them'})" if counts["refused"] else ""))
    if outputs.dicom_out:
        console.print(f"DICOM results (SR, SEG, Secondary Capture) in {outputs.dicom_out}"
                      + (f"; {counts['not_dicom']} input(s) are PNG/JPEG, which get no DICOM results"
                         if counts["not_dicom"] else ""))
    if failures:
        raise typer.Exit(1)


def predict_on_ray(files: list[Path], outputs, run: dict, *, ray: str, workers: int, gpus: float,
                   seg_model: Path | None, model: Path | None, backend: str, device: str, batch_size: int) -> None:
    """``predict --ray``: the same records and files, scored by an actor pool (each actor writes its
    films' overlays and DICOM results), appended in input order. Resumable: films already recorded
    by the same models and options are skipped, films that ended in an error are tried again, and
    a file made by other models or options is refused (never mixed, never taken as done)."""
    from tqdm import tqdm

    from pneumoscan.apps.cluster import ClusterError, predict_records
    from pneumoscan.io import display_name
    from pneumoscan.outputs.writer import (
        RecordSink,
        check_resumable,
        output_stems,
        recorded_paths,
    )

    force = run["force"]
    try:
        check_resumable(outputs, run)
    except ValueError as exc:
        fail(str(exc))
    done = recorded_paths(outputs.target)
    todo = [(str(f), stem) for f, stem in zip(files, output_stems(files)) if display_name(f) not in done]
    with RecordSink(outputs, append=True, run=run) as sink, \
            tqdm(total=len(todo), unit="img", desc="predict (ray)") as bar:
        try:
            for record in predict_records(todo, outputs, address=ray, workers=workers, batch_size=batch_size,
                                          seg=str(seg_model) if seg_model else None,
                                          cls_model=str(model) if model else None, backend=backend,
                                          device=device, gpus_per_worker=gpus, force=force):
                sink.write(record)
                tell(record, force)
                bar.update(1)
        except ClusterError as exc:
            fail(str(exc))
        except OSError as exc:
            bar.close()
            stopped_writing(exc, sink.counts, len(todo), outputs)
    finish(sink.counts, len(files), outputs, force, skipped=len(files) - len(todo))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = 32.0,
    workers: Annotated[int, typer.Option(min=1, help="Images decoded at once (each may take ~0.8 GB for the largest accepted picture).")] = 1,
    queue: Annotated[int, typer.Option(min=0, help="Requests waiting beyond those; more get 503.")] = 8,
    upload_timeout: Annotated[float, typer.Option(min=1, help="Seconds an upload may take; slower ones get 408.")] = 300.0,
    min_upload_rate: Annotated[float, typer.Option(
        min=0, help="KiB/s an upload must average after its first 10 s, else 408 (slow senders cannot "
                    "hold the server's places).")] = 1.0,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="PNEUMOSCAN_API_KEY", help="Key required on every route but /health and / "
                                          "(header X-API-Key); needed off loopback.")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        help="Listen off loopback without an API key (anyone who reaches the port can use it).")] = False,
    allowed_hosts: Annotated[str, typer.Option(
        help="Comma-separated Host names to answer (default: loopback names and --host); '*' for any.")] = "",
    allow_model_mismatch: Annotated[bool, typer.Option(
        help="Run even if the classifier was trained on another lung model's crops.")] = False,
    backend: BackendOption = "auto",
    device: DeviceOption = "cpu",
) -> None:
    """REST API (POST /v1/predict, GET /health, /docs) and the web page at /."""
    try:
        import uvicorn

        from pneumoscan.apps.server import LOOPBACK_HOSTS, UploadPace, create_app
    except ImportError:
        fail("the server needs the web extra: pip install 'pneumoscan[web]'")
    loopback = host in LOOPBACK_HOSTS or host.startswith("127.")
    if not loopback and not api_key and not insecure_no_auth:
        fail(f"--host {host} listens beyond this machine: give --api-key (or PNEUMOSCAN_API_KEY), or "
             f"--insecure-no-auth if something in front of it authenticates")
    hosts = [h.strip() for h in allowed_hosts.split(",") if h.strip()] or \
        [*LOOPBACK_HOSTS, *([] if loopback or host in ("0.0.0.0", "::") else [host])]
    predictor = load_predictor(seg_model, model, backend=backend, device=device,
                               allow_model_mismatch=allow_model_mismatch)
    app = create_app(predictor, max_upload_mb=max_upload_mb, workers=workers, queue=queue, api_key=api_key,
                     allowed_hosts=None if hosts == ["*"] else hosts,
                     pace=UploadPace(deadline_s=upload_timeout, min_rate=min_upload_rate * 1024))
    console.print(f"PneumoScan on http://{host}:{port}/ (API docs at /docs); answering Host names: "
                  f"{', '.join(hosts)}; API key {'required' if api_key else 'not required'}", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@app.command()
def listen(
    out: Annotated[Path, typer.Option(help="Folder for the DICOM results (SR, SEG, Secondary Capture) and predictions.jsonl.")],
    port: Annotated[int, typer.Option(help="TCP port for DICOM (C-STORE, C-ECHO).")] = 11112,
    ae_title: Annotated[str, typer.Option(help="This listener's AE title.")] = "PNEUMOSCAN",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    spool: Annotated[Optional[Path], typer.Option(help="Where received instances wait (default: OUT/.spool).")] = None,
    forward: Annotated[Optional[str], typer.Option(help="Send the results on by C-STORE to HOST:PORT:AET.")] = None,
    forward_dicomweb: Annotated[Optional[str], typer.Option(
        help="Send the results on by DICOMweb STOW-RS to this service root (e.g. http://pacs:8042/dicom-web).")] = None,
    dicomweb_port: Annotated[Optional[int], typer.Option(
        help="Also take films by DICOMweb STOW-RS (POST /studies) on this port, same host.")] = None,
    allow: Annotated[Optional[list[str]], typer.Option(help="Calling AE title allowed to send (repeat); any if omitted.")] = None,
    queue: Annotated[int, typer.Option(min=1, help="Instances waiting (to be processed or forwarded) at most; more are answered 'out of resources'.")] = 64,
    tries: Annotated[int, typer.Option(min=1, help="Tries of an instance whose processing fails before it goes to OUT/failed.")] = 3,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
    backend: BackendOption = "auto",
) -> None:
    """DICOM listener: chest X-rays (CR, DX, Secondary Capture) in by C-STORE (or STOW-RS), SR +
    SEG + Secondary Capture out (and forwarded with --forward / --forward-dicomweb). Received
    instances are spooled to disk first, so a crash loses nothing; C-ECHO answers for monitoring.
    No TLS: keep it behind the hospital's DICOM router or a VPN. Research use only."""
    import logging

    need_extra("dicom", "listen", "pynetdicom", "highdicom")
    from pneumoscan.apps.listen import Forward, Listener, StowForward

    if not 1 <= len(ae_title) <= 16:
        fail("--ae-title must be 1 to 16 characters")
    targets: list = []
    try:
        targets += [Forward.parse(forward)] if forward else []
    except ValueError as exc:
        fail(str(exc))
    if forward_dicomweb:
        need_extra("dicom", "--forward-dicomweb", "dicomweb_client")
        if not forward_dicomweb.startswith(("http://", "https://")):
            fail(f"--forward-dicomweb {forward_dicomweb!r}: expected an http:// or https:// service root")
        targets.append(StowForward(forward_dicomweb.rstrip("/")))
    if dicomweb_port is not None:
        need_extra("web", "--dicomweb-port", "uvicorn", "starlette")
    ensure_writable(out, "--out")
    predictor = load_predictor(seg_model, model, backend=backend, device="cpu", allow_model_mismatch=False)
    from pneumoscan.apps.listen import OneLineFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for noisy in ("pynetdicom", "highdicom", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import pydicom

    # pydicom's validation warnings quote wire values (a patient's, or a forged log line): off here,
    # where every value is checked by the listener itself.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    listener = Listener(predictor, out, spool or out / ".spool", ae_title=ae_title, port=port, host=host,
                        forward=tuple(targets), allow=tuple(allow or ()), queue_size=queue, tries=tries)
    if dicomweb_port is not None:
        start_stow(listener, host, dicomweb_port)
    console.print(f"PneumoScan DICOM listener {ae_title} on {host}:{port}"
                  + (f" (STOW-RS on http://{host}:{dicomweb_port}/studies)" if dicomweb_port is not None else "")
                  + f"; results in {out}"
                  + "".join(f", forwarded to {target}" for target in targets), highlight=False)
    try:
        listener.start(block=True)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        listener.stop()


def start_stow(listener, host: str, port: int) -> None:
    """The listener's STOW-RS door, served by uvicorn on a thread beside the DICOM port."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(listener.stow_app(), host=host, port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # the DICOM side owns the signals
    threading.Thread(target=server.run, name="pneumoscan-stow", daemon=True).start()


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Folder for lung_unet.onnx, classifier.onnx and their metadata.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
) -> None:
    """Export both models for ONNX Runtime (then: pneumoscan predict --onnx OUT)."""
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.predict import Predictor

    if fmt != "onnx":
        fail("only --format onnx is supported")
    try:
        predictor = Predictor.from_paths(seg_model, model, backend="torch")
        from pneumoscan.backends.onnx import export_onnx
    except (ModelFileError, FileNotFoundError) as exc:
        fail(str(exc))
    except ImportError:
        fail("export needs the onnx extra: pip install 'pneumoscan[onnx]'")
    paths = export_onnx(predictor.segmenter, predictor.classifier, out)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":  # pragma: no cover
    app()
