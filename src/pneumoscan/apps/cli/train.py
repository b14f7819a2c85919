"""Training and judging models: ``train-seg``, ``eval-seg``, ``train``, ``evaluate``, ``calibrate``, ``export``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.markup import escape

from pneumoscan.apps.cli.common import (
    BackendOption,
    Dir,
    QuietOption,
    app,
    console,
    ensure_writable,
    err,
    fail,
    numbers,
    print_table,
)
from pneumoscan.errors import PneumoScanError

T = TypeVar("T")


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
    checkpoint_minutes: Annotated[float, typer.Option(
        min=0, help="Every-layer fit: save last.ckpt this often inside an epoch too, so that a killed run "
                    "resumes at the next batch (0 = at epochs' ends only).")] = 15.0,
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
    resume: Annotated[bool, typer.Option(
        help="Continue from OUT/checkpoints/last.ckpt (with --freeze-backbone: OUT/head_state*.pt) if present.")] = True,
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
    schedule: Annotated[str, typer.Option(
        help="plateau (LR × 0.1 after --patience epochs without gain, the thesis) or cosine (warm-up, then "
             "cosine to 0 over --epochs: a schedule fixed in advance for long runs).")] = "plateau",
    warmup_epochs: Annotated[float, typer.Option(min=0, help="cosine: linear warm-up over this many epochs.")] = 0.0,
    val_fold: Annotated[int, typer.Option(
        help="Validate on this patient fold of crossval's folds (0 … 4) and train on the others, ignoring the "
             "manifest split (-1: the manifest's split).")] = -1,
    frozen_bn: Annotated[bool, typer.Option(
        help="Every-layer fit: BatchNorm layers keep their running statistics (eval mode) while the rest learns; "
             "for fine-tuning a backbone whose head was fitted on its frozen features.")] = False,
    opacity_index: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="rsna-nih-masked/index.csv: progress.jsonl also tracks the radiologists' "
                                          "opacity label.")] = None,
    from_checkpoint: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False, help="A .ckpt of an every-layer run with these options: write OUT/model.pt from "
                                          "it (assessed on the validation films) without training; e.g. a long "
                                          "run's last.ckpt, when its validation fold must not choose the epoch.")] = None,
) -> None:
    """Train the DenseNet-121 classifier on a crop cache (checkpoint every epoch, resumable;
    progress.jsonl has the watched figures after every validation)."""
    from pneumoscan.training.classify import TrainConfig, train_classifier

    beta_pair = numbers(betas, f"--betas must be two numbers in [0, 1) like 0.9,0.999, got {betas!r}", 2,
                        lambda b: 0 <= b < 1)
    if init not in ("imagenet", "random") and not Path(init).is_file():
        fail(f"--init must be imagenet, random or an existing model file, got {init!r}")
    if strategy not in ("auto", "ddp", "fsdp"):
        fail(f"--strategy must be auto, ddp or fsdp, got {strategy!r}")
    from pneumoscan.classify import ARCHS
    from pneumoscan.clinical import ClinicalError, parse_fields
    from pneumoscan.crop import ATTENTION_THRESHOLD

    if arch not in ARCHS:
        fail(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    from pneumoscan.training.fit_tail import TRAIN_FROM

    if train_from is not None and train_from not in TRAIN_FROM:
        fail(f"--train-from must be one of {', '.join(TRAIN_FROM)}, got {train_from!r}")
    if from_checkpoint is not None and (freeze_backbone or train_from is not None):
        fail("--from-checkpoint takes the model of an every-layer run's checkpoint: it excludes --freeze-backbone "
             "and --train-from")
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
                      max_minutes=max_minutes, checkpoint_minutes=checkpoint_minutes, source_balance=source_balance,
                      epoch_size=epoch_size,
                      adult_share=adult_share, freeze_backbone=freeze_backbone,
                      min_positives=min_positives, arch=arch, clinical=fields, attention_thresholds=thresholds,
                      train_from=train_from or "", select=select, view_balance=view_balance,
                      schedule=schedule, warmup_epochs=warmup_epochs, val_fold=val_fold, frozen_bn=frozen_bn,
                      opacity_index=str(opacity_index) if opacity_index else "",
                      from_checkpoint=str(from_checkpoint) if from_checkpoint else "")
    try:
        meta = train_classifier(cfg)
    except (PneumoScanError, ValueError) as exc:
        fail(str(exc))
    if meta is not None:
        console.print(f"model written to {out / 'model.pt'}")
        assessed = [label for label, a in meta["assessment"].items() if a["assessed"]]
        console.print(headline(meta["validation"]["within_source"], "validation", assessed), highlight=False)
        console.print(f"assessed labels ({len(assessed)} of 15): {', '.join(assessed) or 'none'}; the "
                      f"others are reported as 'not assessed' (reasons in the model's metadata)",
                      highlight=False)


@app.command()
def crossval(
    cache: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Crop cache (pneumoscan prepare).")],
    backbone: Annotated[Path, typer.Option(exists=True, dir_okay=False,
                                           help="Classifier file whose frozen backbone the new head reads.")],
    out: Annotated[Path, typer.Option(help="Run folder: features, cv_report.json, oof.csv, model.pt.")],
    folds: Annotated[int, typer.Option(help="Patient-grouped folds (hash of the patient key).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the fold hash.")] = 2026,
    source_balance: Annotated[float, typer.Option(
        help="Inside a population, a source's loss weight ∝ its size^this (0: every source equal, so the "
             "few NIH originals weigh as much as the many lung-masked copies).")] = 0.0,
    adult_share: Annotated[float, typer.Option(help="Share of the loss weight on adult films.")] = 0.8,
    view_balance: Annotated[bool, typer.Option(help="Make every label independent of AP/PA inside a source.")] = True,
    min_positives: Annotated[int, typer.Option(help="Labels with fewer positives stay out of the loss.")] = 50,
    against_normal: Annotated[str, typer.Option(
        help="Labels learnt and judged against No Finding films only (comma-separated; '' for none).")] = "Pneumonia",
    threshold_rule: Annotated[str, typer.Option(help="youden, specificity or sensitivity.")] = "specificity",
    target: Annotated[float, typer.Option(help="The specificity or sensitivity the thresholds reach.")] = 0.9,
    domain_weights: Annotated[str, typer.Option(
        help="Multipliers of the NIH originals' loss weight to choose from, inside each fold, by the AUC on "
             "originals of an inner split (comma-separated, e.g. 1,2,4,8,16; '1' keeps their source share; "
             "docs/ADULT.md has the trade-off measured).")] = "1",
    per_label_l2: Annotated[bool, typer.Option(
        help="Choose the L2 strength per label (each label's own inner AUC) instead of one for all.")] = False,
    l2_grid: Annotated[Optional[str], typer.Option(
        help="L2 strengths (on standardised features) to choose from inside each fold, comma-separated "
             "(default: the built-in grid, training.crossval.L2_GRID).")] = None,
    description: Annotated[str, typer.Option(help="Training-data description for the model card.")] = "",
) -> None:
    """Fit the classifier's final stage on a frozen backbone with patient-grouped cross-validation:
    every figure, threshold and assessed flag comes from films the fitted head never saw."""
    from pneumoscan.training.crossval import CrossvalConfig, run_crossval

    if folds < 3:
        fail(f"--folds must be at least 3, got {folds}")
    if not 0 <= adult_share <= 1:
        fail(f"--adult-share must be in [0, 1], got {adult_share}")
    from pneumoscan.labels import LABELS

    contrast = tuple(name.strip() for name in against_normal.split(",") if name.strip())
    unknown = sorted(set(contrast) - set(LABELS) | ({"No Finding"} & set(contrast)))
    if unknown:
        fail(f"--against-normal names labels that cannot be learnt against normal films: {unknown}")
    if threshold_rule not in ("youden", "specificity", "sensitivity"):
        fail(f"--threshold-rule must be youden, specificity or sensitivity, got {threshold_rule!r}")
    if threshold_rule != "youden" and not 0 < target < 1:
        fail(f"--target must be between 0 and 1, got {target}")
    weights = numbers(domain_weights, f"--domain-weights must be positive comma-separated numbers, got "
                      f"{domain_weights!r}", valid=lambda w: w > 0)
    from pneumoscan.training.crossval import L2_GRID

    strengths = L2_GRID if l2_grid is None else numbers(
        l2_grid, f"--l2-grid must be positive comma-separated numbers, got {l2_grid!r}", valid=lambda w: w > 0)
    ensure_writable(out, "--out")
    cfg = CrossvalConfig(cache=str(cache), backbone=str(backbone), out=str(out), folds=folds, seed=seed,
                         source_balance=source_balance, adult_share=adult_share, view_balance=view_balance,
                         min_positives=min_positives, description=description, normal_contrast=contrast,
                         operating=threshold_rule, target=None if threshold_rule == "youden" else target,
                         domain_weights=weights, l2_grid=strengths, per_label_l2=per_label_l2)
    result = scored_or_fail(lambda: run_crossval(cfg, progress=lambda m: err.print(m, highlight=False)))
    assessed = [label for label, a in result["assessment"].items() if a["assessed"]]
    console.print(f"model written to {out / 'model.pt'}")
    console.print(headline(result["report"]["within_source"], f"out-of-fold ({folds}-fold CV)", assessed),
                  highlight=False)
    console.print(f"assessed labels ({len(assessed)} of 15): {', '.join(assessed) or 'none'}", highlight=False)


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
        result = scored_or_fail(lambda: compare_models(manifest, split, models, cache=cache, seg_model=seg_model,
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


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Folder for lung_unet.onnx, classifier.onnx, heart_unet.onnx and their "
                                           "metadata.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
) -> None:
    """Export the models for ONNX Runtime: lungs, classifier and the shipped heart model (then:
    pneumoscan predict --onnx OUT)."""
    from pneumoscan.predict import Predictor

    if fmt != "onnx":
        fail("only --format onnx is supported")
    try:
        predictor = Predictor.from_paths(seg_model, model, backend="torch")
        from pneumoscan.backends.onnx import export_onnx
    except (PneumoScanError, FileNotFoundError) as exc:
        fail(str(exc))
    except ImportError:
        fail("export needs the onnx extra: pip install 'pneumoscan[onnx]'")
    paths = export_onnx(predictor.segmenter, predictor.classifier, out, heart=predictor.heart)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
