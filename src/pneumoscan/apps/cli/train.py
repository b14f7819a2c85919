"""Training the classifier: ``train`` (every layer, or the head on a frozen backbone) and ``crossval``
(the head fitted and judged by patient-grouped cross-validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pneumoscan.apps.cli.common import (
    app,
    console,
    ensure_writable,
    err,
    fail,
    numbers,
)
from pneumoscan.apps.cli.judge import headline, scored_or_fail
from pneumoscan.errors import PneumoScanError

#: train's options whose help runs over a line (Typer's Annotated aliases).
CheckpointMinutesOption = Annotated[float, typer.Option(
    min=0, help="Every-layer fit: save last.ckpt this often inside an epoch too, so that a killed run "
                "resumes at the next batch (0 = at epochs' ends only).")]
NumNodesOption = Annotated[int, typer.Option(min=1, help="Machines (Lightning reads the launcher's environment; "
                                                   "docs/MULTINODE.md).")]
SourceBalanceOption = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="Inside adult and inside paediatric films: a source's share "
                           "∝ its size to this power (0 = sources equal, 1 = as indexed).")]
AdultShareOption = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="Share of draws from adult films; the rest from paediatric ones.")]
MinPositivesOption = Annotated[int, typer.Option(
    min=0, help="Leave labels with fewer training positives out of the loss.")]
FreezeBackboneOption = Annotated[bool, typer.Option(
    help="Train the head only on frozen DenseNet features (first stage of linear-probe-then-fine-tune).")]
ResumeOption = Annotated[bool, typer.Option(
    help="Continue from OUT/checkpoints/last.ckpt (with --freeze-backbone: OUT/head_state*.pt) if present.")]
ArchOption = Annotated[str, typer.Option(
    help="densenet121 (the thesis's) or agcnn (+ a local branch on the attention box, cut from the "
         "original image; trains stage-wise with --freeze-backbone).")]
ClinicalOption = Annotated[Optional[str], typer.Option(
    help="Patient information fused with the image: manifest columns, e.g. age,sex,view (each with a "
         "learnt 'missing' value; needs --freeze-backbone).")]
AttentionThresholdOption = Annotated[Optional[list[float]], typer.Option(
    help="AG-CNN attention threshold(s) in (0, 1); several: the best on validation is kept.")]
TrainFromOption = Annotated[Optional[str], typer.Option(
    help="Fine-tune from this block on (denseblock3 or denseblock4) with the earlier layers frozen and "
         "their output computed once: about 20 images/s on 2 CPU cores instead of 3 for every layer.")]
SelectOption = Annotated[str, typer.Option(
    help="Labels whose mean within-source validation AUC picks the checkpoint: comma-separated names, "
         "or 'all' (every label that reaches the loss).")]
ViewBalanceOption = Annotated[bool, typer.Option(
    help="Weigh the loss so that no label follows the view position (AP/PA) inside a source.")]
ScheduleOption = Annotated[str, typer.Option(
    help="plateau (LR × 0.1 after --patience epochs without gain, the thesis) or cosine (warm-up, then "
         "cosine to 0 over --epochs: a schedule fixed in advance for long runs).")]
ValFoldOption = Annotated[int, typer.Option(
    help="Validate on this patient fold of crossval's folds (0 … 4) and train on the others, ignoring the "
         "manifest split (-1: the manifest's split).")]
FrozenBnOption = Annotated[bool, typer.Option(
    help="Every-layer fit: BatchNorm layers keep their running statistics (eval mode) while the rest learns; "
         "for fine-tuning a backbone whose head was fitted on its frozen features.")]
OpacityIndexOption = Annotated[Optional[Path], typer.Option(
    exists=True, dir_okay=False, help="rsna-nih-masked/index.csv: progress.jsonl also tracks the radiologists' "
                                      "opacity label.")]
FromCheckpointOption = Annotated[Optional[Path], typer.Option(
    exists=True, dir_okay=False, help="A .ckpt of an every-layer run with these options: write OUT/model.pt from "
                                      "it (assessed on the validation films) without training; e.g. a long "
                                      "run's last.ckpt, when its validation fold must not choose the epoch.")]


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
    checkpoint_minutes: CheckpointMinutesOption = 15.0,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader workers per process.")] = 2,
    accelerator: Annotated[str, typer.Option(help="auto, cpu or gpu.")] = "auto",
    devices: Annotated[int, typer.Option(min=1, help="Processes/GPUs per node (DDP when > 1).")] = 1,
    num_nodes: NumNodesOption = 1,
    strategy: Annotated[str, typer.Option(help="auto (DDP when devices × nodes > 1), ddp or fsdp.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16-mixed on GPU), 32-true, 16-mixed, ...")] = "auto",
    seed: Annotated[int, typer.Option()] = 2019,
    all_views: Annotated[bool, typer.Option(help="Also train on lateral views.")] = False,
    source_balance: SourceBalanceOption = 0.5,
    adult_share: AdultShareOption = 0.5,
    epoch_size: Annotated[int, typer.Option(min=0, help="Images drawn per epoch (0 = training-set size).")] = 0,
    min_positives: MinPositivesOption = 50,
    freeze_backbone: FreezeBackboneOption = False,
    resume: ResumeOption = True,
    arch: ArchOption = "densenet121",
    clinical: ClinicalOption = None,
    attention_threshold: AttentionThresholdOption = None,
    description: Annotated[str, typer.Option(help="Training-data description for the model card.")] = "",
    train_from: TrainFromOption = None,
    select: SelectOption = "Pneumonia",
    view_balance: ViewBalanceOption = False,
    schedule: ScheduleOption = "plateau",
    warmup_epochs: Annotated[float, typer.Option(min=0, help="cosine: linear warm-up over this many epochs.")] = 0.0,
    val_fold: ValFoldOption = -1,
    frozen_bn: FrozenBnOption = False,
    opacity_index: OpacityIndexOption = None,
    from_checkpoint: FromCheckpointOption = None,
) -> None:
    """Train the DenseNet-121 classifier on a crop cache (checkpoint every epoch, resumable;
    progress.jsonl has the watched figures after every validation)."""
    from pneumoscan.clinical import ClinicalError, parse_fields
    from pneumoscan.crop import ATTENTION_THRESHOLD
    from pneumoscan.training.classify import TrainConfig, train_classifier

    beta1, beta2 = numbers(betas, f"--betas must be two numbers in [0, 1) like 0.9,0.999, got {betas!r}", 2)
    thresholds = tuple(attention_threshold or (ATTENTION_THRESHOLD,))
    try:
        fields = tuple(parse_fields(clinical)) if clinical is not None else ()
    except ClinicalError as exc:
        fail(str(exc))
    try:
        cfg = TrainConfig(cache=str(cache), out=str(out), init=init, weights=str(weights) if weights else None,
                          epochs=epochs, batch_size=batch_size, lr=lr, betas=(beta1, beta2), patience=patience,
                          early_stop=early_stop, seed=seed, workers=workers, accelerator=accelerator,
                          devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
                          frontal_only=not all_views, resume=resume, description=description,
                          max_minutes=max_minutes, checkpoint_minutes=checkpoint_minutes, source_balance=source_balance,
                          epoch_size=epoch_size, adult_share=adult_share, freeze_backbone=freeze_backbone,
                          min_positives=min_positives, arch=arch, clinical=fields, attention_thresholds=thresholds,
                          train_from=train_from or "", select=select, view_balance=view_balance,
                          schedule=schedule, warmup_epochs=warmup_epochs, val_fold=val_fold, frozen_bn=frozen_bn,
                          opacity_index=str(opacity_index) if opacity_index else "",
                          from_checkpoint=str(from_checkpoint) if from_checkpoint else "")
    except ValueError as exc:
        fail(str(exc))
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
