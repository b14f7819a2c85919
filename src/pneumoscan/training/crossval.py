"""The classifier's final stage fitted and judged by patient-grouped cross-validation.

Why: a 44-film validation split once chose the epoch, the thresholds and the assessed flags, and
its figures did not survive unseen films; and a head fitted on lung-masked films of one
repository (another U-Net's mask, 448² copies) did not carry over to NIH originals masked by ours
(``docs/ADULT.md``). Here every labelled film of the crop cache, NIH originals included, is in
the cross-validation, and:

- the backbone is frozen (a PneumoScan classifier file); its pooled features are computed once;
- the final stage is a linear head (one logistic output per label), the thesis's weighted
  binary cross-entropy over known labels with the project's source balancing and, optionally, the
  view balancing, plus an L2 penalty, fitted to convergence by L-BFGS;
- films fall into ``folds`` folds by a hash of their patient key (a patient's films, NIH
  originals and lung-masked copies alike, are in one fold); each fold is scored by the head fitted
  on the others, its L2 strength and the weight of the films read as in use (NIH originals masked
  by our U-Net) chosen on an inner patient-grouped split of those others, judged on those films;
- the out-of-fold probabilities, each from a head that never saw the film or its patient, choose
  the assessed flags and thresholds (:func:`pneumoscan.training.evaluate.assess_labels`), fit the
  calibration maps, the paediatric reading and the age estimate
  (:func:`pneumoscan.training.reading_fit.fit_reading`) and are the figures reported; the shipped head is then fitted on all
  films with the settings most
  folds chose.

The linear head is written into the ordinary two-layer head of :class:`~pneumoscan.networks.ChestClassifier`: the
pooled features are post-ReLU (never negative), so a first layer that is the identity passes them
through its ReLU unchanged, and loading, ONNX export and Grad-CAM need nothing new.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoscan.classify import Classifier
from pneumoscan.explain import head_linears
from pneumoscan.labels import LABELS
from pneumoscan.networks import FEATURES, ChestClassifier
from pneumoscan.progress import note
from pneumoscan.training.cache import CropCache
from pneumoscan.training.data import (
    mask_single_class_sources,
    patient_folds,
    sampling_weights,
    select_rows,
    training_labels,
    view_balance_weights,
)
from pneumoscan.training.finalise import reference_films
from pneumoscan.training.fit_head import branch_features
from pneumoscan.training.loss import masked_bce, positive_weights
from pneumoscan.training.metrics import selection_score
from pneumoscan.training.reading_fit import fit_reading

#: L2 strengths tried (on standardised features, per mean image loss).
L2_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3)
#: Multipliers of the loss weight of the films read as in use (``confirm_in``) to choose from. The
#: default keeps their source share: a choice among (1, 2, 4, 8, 16) raised NIH Pneumonia vs No
#: Finding on the originals and lowered Cardiomegaly and the radiologists' opacity label on the
#: same films (docs/ADULT.md), so it is an option, for sites whose own films are the domain.
DOMAIN_WEIGHTS = (1.0,)


@dataclass
class CrossvalConfig:
    cache: str
    backbone: str  # a PneumoScan classifier file whose frozen features the head reads
    out: str
    folds: int = 5
    seed: int = 2026
    l2_grid: tuple[float, ...] = L2_GRID
    domain_weights: tuple[float, ...] = DOMAIN_WEIGHTS
    source_balance: float = 0.0
    adult_share: float = 0.8
    view_balance: bool = True
    normal_contrast: tuple[str, ...] = ("Pneumonia",)
    operating: str = "specificity"  # how thresholds are chosen: youden, specificity or sensitivity
    target: float | None = 0.9
    confirm_in: str = "nih"  # every assessed label must also reach the AUC bar on these films (unmasked NIH)
    min_positives: int = 50
    frontal_only: bool = True
    #: choose the L2 strength per label (inner split, each label's own AUC) instead of one for all
    per_label_l2: bool = False
    description: str = ""


def against_normal(labels: np.ndarray, labels_of: tuple[str, ...]) -> np.ndarray:
    """Labels where each of ``labels_of`` is learnt and judged against normal films: a negative
    that is not a No Finding film becomes unknown (NaN).

    Why for Pneumonia: NIH's pneumonia label is mined from reports, and on a film pneumonia looks
    like the infiltration, consolidation or oedema that its "negatives" carry; a linear output
    asked to tell those apart learnt neither (out-of-fold AUC of NIH pneumonia against every other
    lung-masked film 0.58). Against normal films it is the question users ask of a pneumonia
    output (is this film abnormal in a way that pneumonia explains?), and its figures must say
    so: it does not separate pneumonia from other opacities."""
    out = labels.copy()
    normal = labels[:, LABELS.index("No Finding")] == 1
    for label in labels_of:
        j = LABELS.index(label)
        out[(labels[:, j] == 0) & ~normal, j] = np.nan
    return out


def row_weights(labels: np.ndarray, sources: np.ndarray, views: np.ndarray, cfg: CrossvalConfig,
                domain_weight: float = 1.0) -> np.ndarray:
    """N×15 loss weights: the training sampler's source balance as weights (mean 1) times, with
    ``view_balance``, the weights that make every label independent of the view; the films of
    ``cfg.confirm_in`` (read and masked as in use) weigh ``domain_weight`` times their share."""
    w = sampling_weights(sources, cfg.source_balance, cfg.adult_share)
    w = np.where(sources == cfg.confirm_in, w * domain_weight, w)
    w = (w / w.mean()).astype(np.float32)[:, None] * np.ones((1, len(LABELS)), np.float32)
    if cfg.view_balance:
        w = w * view_balance_weights(labels, sources, views)
    return w


def fit_linear_head(x: np.ndarray, labels: np.ndarray, weights: np.ndarray, l2: float | Sequence[float],
                    max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Per-label logistic regression by weighted BCE over known labels (positive weight =
    negatives / positives) + ``l2``/2 ‖W‖² on standardised features (``l2`` one strength, or one per
    label); returns (W 15×F, b 15) on the raw features (the standardisation folded in)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = torch.from_numpy((x - mean) / std)
    y, w = torch.from_numpy(labels), torch.from_numpy(weights)
    pos_weight = torch.from_numpy(positive_weights(labels))
    strength = torch.from_numpy(np.broadcast_to(np.asarray(l2, np.float32), (labels.shape[1],)).copy())[:, None]
    W = torch.zeros(labels.shape[1], x.shape[1], requires_grad=True)
    b = torch.zeros(labels.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = masked_bce(z @ W.T + b, y, pos_weight, w) + 0.5 * (strength * W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W_raw = W.detach().numpy() / std[None, :]
    return W_raw.astype(np.float32), (b.detach().numpy() - W_raw @ mean).astype(np.float32)


def linear_probs(x: np.ndarray, head: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    from scipy.special import expit

    W, b = head
    return expit(x @ W.T + b).astype(np.float32)


def choose_settings(x: np.ndarray, labels: np.ndarray, sources: np.ndarray, views: np.ndarray,
                    patients: np.ndarray, cfg: CrossvalConfig, salt: int
                    ) -> tuple[float, float | tuple[float, ...], dict[str, float]]:
    """The (domain weight, L2 strength) with the best mean within-source AUC of every trained label
    on an inner patient-grouped quarter of these films (fitted on the other three quarters),
    judged on the ``confirm_in`` films of that quarter when it holds any.

    Why judged there: the lung-masked copies outnumber the films masked by our own U-Net 16 to 1,
    and a head that suits the copies does not carry over to the originals (docs/ADULT.md); the
    weight of the originals is a choice like the L2 strength, so it is made inside each fold,
    on films the scored fold never lends. With ``cfg.per_label_l2`` each label then takes the
    strength with its own best inner AUC at that domain weight (the loss is a mean over every known
    label, so one strength regularises a label with few known films far more than a common one)."""
    inner = patient_folds(patients, 4, cfg.seed * 31 + salt) == 0
    select = tuple(lab for j, lab in enumerate(LABELS) if (~np.isnan(labels[~inner, j])).any())
    judged = inner & (sources == cfg.confirm_in) if (sources[inner] == cfg.confirm_in).any() else inner
    scores: dict[tuple[float, float], float] = {}
    parts: dict[tuple[float, float], dict[str, float]] = {}
    for dw in cfg.domain_weights:
        weights = row_weights(labels[~inner], sources[~inner], views[~inner], cfg, dw)
        for l2 in cfg.l2_grid:
            head = fit_linear_head(x[~inner], labels[~inner], weights, l2)
            scores[dw, l2], parts[dw, l2] = selection_score(labels[judged], linear_probs(x[judged], head),
                                                            sources[judged], select)
    dw, l2 = max(scores, key=lambda k: scores[k] if np.isfinite(scores[k]) else -np.inf)
    inner_scores = {f"{w:g}/{s:g}": score for (w, s), score in scores.items()}
    if not cfg.per_label_l2:
        return dw, l2, inner_scores
    return dw, tuple(label_strength(label, {s: parts[dw, s] for s in cfg.l2_grid}, l2) for label in LABELS), inner_scores


def label_strength(label: str, parts: dict[float, dict[str, float]], fallback: float) -> float:
    """The L2 strength under which ``label``'s mean within-source inner AUC is highest (the larger
    strength on a tie), or ``fallback`` where the inner split cannot judge the label."""
    mean = {s: np.mean([v for k, v in p.items() if k.split("/")[0] == label] or [np.nan]) for s, p in parts.items()}
    judged = {s: v for s, v in mean.items() if np.isfinite(v)}
    return max(judged, key=lambda s: (judged[s], s)) if judged else fallback


def describe_l2(l2: float | Sequence[float]) -> str:
    """One strength, or the per-label ones grouped by value."""
    if np.ndim(l2) == 0:
        return f"L2 {l2:g}"
    groups: dict[float, list[str]] = {}
    for label, s in zip(LABELS, np.atleast_1d(l2)):
        groups.setdefault(float(s), []).append(label)
    return "L2 per label: " + "; ".join(f"{s:g} ({', '.join(names)})" for s, names in sorted(groups.items()))


def cross_validate(x: np.ndarray, labels: np.ndarray, sources: np.ndarray, views: np.ndarray,
                   patients: np.ndarray, cfg: CrossvalConfig, progress=print) -> dict[str, Any]:
    """Out-of-fold probabilities (N×15), each fold's chosen L2 and inner scores. ``labels`` are
    the loss's labels (:func:`training_labels`); the caller keeps the raw ones for judging."""
    fold_of = patient_folds(patients, cfg.folds, cfg.seed)
    oof = np.full(labels.shape, np.nan, np.float32)
    chosen = []
    for f in range(cfg.folds):
        train = fold_of != f
        dw, l2, scores = choose_settings(x[train], labels[train], sources[train], views[train], patients[train], cfg, f)
        head = fit_linear_head(x[train], labels[train], row_weights(labels[train], sources[train], views[train], cfg, dw), l2)
        oof[~train] = linear_probs(x[~train], head)
        chosen.append({"fold": f, "films": int((~train).sum()), "domain_weight": dw, "l2": l2, "inner_scores": scores})
        best = max(v for k, v in scores.items() if k.startswith(f"{dw:g}/"))
        progress(f"fold {f + 1}/{cfg.folds}: {int((~train).sum())} films scored; {cfg.confirm_in} films weighted "
                 f"×{dw:g}, {describe_l2(l2)} (inner mean within-source AUC {best:.3f})")
    return {"oof": oof, "fold": fold_of, "folds": chosen}


def linear_into_model(model: ChestClassifier, head: tuple[np.ndarray, np.ndarray]) -> ChestClassifier:
    """A copy of ``model``'s backbone with the linear head written into the two-layer head: first
    layer the identity (the pooled features are post-ReLU, ≥ 0, so its ReLU changes nothing),
    second layer the logistic weights."""
    out = ChestClassifier(hidden=FEATURES)
    out.net.features.load_state_dict(model.net.features.state_dict())
    W, b = head
    first, last = head_linears(out.head)
    with torch.no_grad():
        first.weight.copy_(torch.eye(FEATURES))
        first.bias.zero_()
        last.weight.copy_(torch.from_numpy(W))
        last.bias.copy_(torch.from_numpy(b))
    return out.eval()


def run_crossval(cfg: CrossvalConfig, progress=None) -> dict[str, Any]:
    """Cross-validate, decide assessment and thresholds on the out-of-fold probabilities, fit the
    shipped head on every film, and write ``model.pt``, ``cv_report.json`` and ``oof.csv``."""
    import pandas as pd

    from pneumoscan.training.tables import (
        MIN_VAL_PER_CLASS,
        assess_labels,
        evaluate_probabilities,
    )

    def say(message: str) -> None:
        note(message) if progress is None else progress(message)

    started = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    cache, parent = CropCache(cfg.cache), Classifier.load(cfg.backbone)
    if parent.fused:
        raise ValueError("the cross-validated head reads the plain DenseNet-121's features; "
                         f"{cfg.backbone} is an AG-CNN or patient-information model")
    if parent.lung_masked != cache.lung_masked:
        raise ValueError(f"{cfg.backbone} learnt from {'lung-masked' if parent.lung_masked else 'plain'} crops "
                         f"but the cache holds {'lung-masked' if cache.lung_masked else 'plain'} ones")
    rows = np.sort(np.concatenate(list(select_rows(cache, cfg.frontal_only).values())))
    table = cache.table.iloc[rows]
    say(f"features of {len(rows)} films from the frozen backbone (computed once, kept in {out}) …")
    x = branch_features(parent.model, cache, rows, out / "features.npz")["global"]
    raw = against_normal(table[list(LABELS)].to_numpy(np.float32), cfg.normal_contrast)
    sources = table["source"].astype(str).to_numpy()
    views = table["view"].fillna("").astype(str).str.upper().to_numpy()
    patients = table["patient"].astype(str).to_numpy()
    labels, masked, too_few = training_labels(raw, sources, cfg.min_positives)
    say(f"{cfg.folds}-fold cross-validation grouped by patient ({len(set(patients))} patients) …")
    cv = cross_validate(x, labels, sources, views, patients, cfg, say)
    frame = pd.DataFrame(cv["oof"], columns=list(LABELS))
    frame.insert(0, "fold", cv["fold"])
    frame.insert(0, "path", table["path"].to_numpy())
    frame.to_csv(out / "oof.csv", index=False, float_format="%.6f")
    say("assessing each label on the out-of-fold probabilities (bootstrap CIs) …")
    train_labels = mask_single_class_sources(raw, sources)[0]  # the positives the loss could see, as finalise counts
    assessment = assess_labels(raw, cv["oof"], sources, train_labels, sources, method=cfg.operating,
                               target=cfg.target, confirm_in=cfg.confirm_in if cfg.confirm_in in sources else None)
    for label in cfg.normal_contrast:
        assessment[label]["against"] = "No Finding films only (other films are neither positive nor negative)"
    thresholds = {label: assessment[label]["threshold"] for label in LABELS}
    report = evaluate_probabilities(raw, cv["oof"], thresholds, split=f"out-of-fold ({cfg.folds}-fold CV)",
                                    sources=sources, patients=patients)
    dw, l2 = shipped_settings(cv["folds"])
    say(f"fitting the shipped head on all {len(rows)} films ({cfg.confirm_in} films ×{dw:g}, {describe_l2(l2)}) …")
    head = fit_linear_head(x, labels, row_weights(labels, sources, views, cfg, dw), l2)
    classifier = Classifier(linear_into_model(parent.model, head),
                            shipped_meta(parent, cfg, table, masked, too_few, l2, dw))
    classifier.set_assessment(assessment)
    sample, adult = reference_films(np.arange(len(rows)), sources)
    classifier.set_cam_reference(x[sample].mean(0), f"mean of {len(sample)} {'adult ' if adult else ''}films "
                                                    f"of the cross-validation")
    classifier.meta["validation"] = {"within_source": report["within_source"], "n_images": report["n_images"],
                                     "protocol": f"out-of-fold probabilities, {cfg.folds}-fold cross-validation "
                                                 f"grouped by patient (seed {cfg.seed})",
                                     "pooled_auc_not_a_finding_measure": report["auc"]}
    fit_reading(classifier, x, table, cv["oof"], cv["fold"], method=cfg.operating, target=cfg.target, progress=say)
    classifier.meta["threshold_provenance"] = {
        "method": "cross-validation", "images": int(len(rows)), "folds": cfg.folds,
        "rule": (f"{cfg.operating}" + ("" if cfg.target is None else f" {cfg.target:g}")
                 + f" on the out-of-fold probabilities of source {cfg.confirm_in} where it holds {MIN_VAL_PER_CLASS} "
                   "positives and negatives of the label, else inside the adult source that assessed it"),
        "parent_model_sha256": parent.meta.get("sha256") or parent.meta["weights_sha256"]}
    written = classifier.save(out / "model.pt")
    report["folds"] = cv["folds"]
    report["l2_shipped"], report["domain_weight_shipped"] = l2, dw
    report["seconds"] = round(time.time() - started, 1)
    (out / "cv_report.json").write_text(json.dumps(report, indent=2))
    return {"model": written, "report": report, "assessment": assessment}


def shipped_settings(folds: list[dict[str, Any]]) -> tuple[float, float | tuple[float, ...]]:
    """The (domain weight, L2 strength) pair most folds chose; with one strength per label, the
    domain weight most folds chose and, per label, the strength most of those folds chose."""
    if np.ndim(folds[0]["l2"]) == 0:
        return Counter((f["domain_weight"], f["l2"]) for f in folds).most_common(1)[0][0]
    dw = Counter(f["domain_weight"] for f in folds).most_common(1)[0][0]
    chosen = [f["l2"] for f in folds if f["domain_weight"] == dw]
    return dw, tuple(Counter(c[j] for c in chosen).most_common(1)[0][0] for j in range(len(chosen[0])))


def shipped_meta(parent: Classifier, cfg: CrossvalConfig, table, masked: dict[str, list[str]],
                 too_few: list[str], l2: float | tuple[float, ...], domain_weight: float) -> dict[str, Any]:
    """The shipped model's metadata: the parent's preprocessing and input, the new head's data."""
    meta: dict[str, Any] = {k: parent.meta[k] for k in ("kind", "labels", "input_size", "preprocessing")
                            if k in parent.meta}
    meta.update({
        "hidden": FEATURES, "dropout": 0.4, "architecture": {"name": "densenet121", "head": (
            "linear (logistic per label), written into the two-layer head with an identity first layer")},
        "init": {"init": "checkpoint", "from_sha256": parent.meta.get("sha256") or parent.meta["weights_sha256"],
                 "frozen": "every layer but the head"},
        "training_data": {
            "description": cfg.description or f"crop cache {Path(cfg.cache).name}, every labelled frontal film",
            "images_per_source": {str(k): int(v) for k, v in table["source"].value_counts().items()},
            "train_images": int(len(table)),
            "split": f"{cfg.folds}-fold cross-validation grouped by patient for every figure and choice; "
                     "the shipped head fitted on all films",
            "sampling": {"adult_share": cfg.adult_share, "source_balance": cfg.source_balance,
                         "view_balance": cfg.view_balance, "as": "loss weights",
                         "domain_weight": {"source": cfg.confirm_in, "times": domain_weight,
                                           "grid": list(cfg.domain_weights)}},
            "labels_masked_in_single_class_sources": masked,
            "labels_left_out_of_the_loss": {"min_positives": cfg.min_positives, "labels": too_few},
        },
        "labels_against_normal": {"labels": list(cfg.normal_contrast), "negatives": "No Finding films only"},
        "optimiser": {"name": "L-BFGS (strong Wolfe)", "loss": "weighted BCE over known labels + L2",
                      "l2": dict(zip(LABELS, l2)) if isinstance(l2, tuple) else l2, "l2_grid": list(cfg.l2_grid),
                      "trained": "head only (backbone frozen)"},
        "selection": {"metric": f"domain weight and L2 strength by the mean AUC of every trained label on the "
                                f"{cfg.confirm_in} films of an inner patient-grouped quarter of each fold's training "
                                "films; the shipped head takes the pair most folds chose"},
    })
    return meta
