"""A new head on frozen backbones (``train --freeze-backbone``): the linear-probe stage of
linear-probe-then-fine-tune transfer learning, and the way AG-CNN and patient-information models
are fitted. The frozen branches' pooled features are computed once and kept; the head's fit
resumes from its saved state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoscan.clinical import ClinicalSpec, drop_fields, table_records
from pneumoscan.crop import attention_box, local_crop
from pneumoscan.explain import head_linears
from pneumoscan.networks import FEATURES, ChestClassifier
from pneumoscan.training.cache import CropCache
from pneumoscan.training.config import TrainConfig
from pneumoscan.training.data import BalancedSampler, CropDataset
from pneumoscan.training.fit_loop import FitLoop
from pneumoscan.training.metrics import SELECT_LABELS


def with_options(plain: ChestClassifier, arch: str, spec: ClinicalSpec | None) -> ChestClassifier:
    """The AG-CNN and/or patient-information model whose global branch (and, for AG-CNN, local
    branch: the paper initialises both alike) starts as ``plain``'s backbone; the head is new."""
    model = ChestClassifier(arch=arch, clinical=spec)
    model.net.features.load_state_dict(plain.net.features.state_dict())
    if model.local is not None:
        model.local.load_state_dict(plain.net.features.state_dict())
    return model


def branch_features(model: ChestClassifier, cache: CropCache, indices: np.ndarray, path: Path,
                    thresholds: tuple[float, ...] = ()) -> dict[str, Any]:
    """Pooled post-ReLU features of cache rows from the frozen branches, computed once and kept
    in ``path`` (a rerun, or a resumed run, does not pay for them twice): ``global`` N×1024 and,
    for each AG-CNN attention threshold, ``local[t]`` N×1024, the local branch's features of the
    attention box cut from the original image (read again, as in prediction)."""
    from tqdm import tqdm

    wanted = [f"local_{t:g}" for t in thresholds]
    if path.exists():
        saved = np.load(path)
        if np.array_equal(saved["indices"], indices) and all(k in saved for k in wanted):
            return {"global": saved["features"], "local": {t: saved[k] for t, k in zip(thresholds, wanted)}}
    model.eval()
    out = np.zeros((len(indices), FEATURES), np.float32)
    local = {t: np.zeros((len(indices), FEATURES), np.float32) for t in thresholds}
    with torch.inference_mode():
        for start in tqdm(range(0, len(indices), 32), desc=f"features {path.stem}", unit="batch"):
            batch = indices[start:start + 32]
            x = torch.from_numpy(cache.images(batch).astype(np.float32) / 255.0)[:, None]
            features = model.feature_map(x)
            out[start:start + len(x)] = features.mean(dim=(2, 3)).numpy()
            maps = features.numpy()
            if thresholds:
                originals = [cache.original(int(i)) for i in batch]
                boxes = [cache.lung_box(int(i)) for i in batch]
                for t in thresholds:
                    crops = [local_crop(pixels, lung, attention_box(m, t, cache.size), cache.size)
                             for pixels, lung, m in zip(originals, boxes, maps)]
                    stacked = torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0)[:, None]
                    local[t][start:start + len(x)] = model.local_pooled(stacked).numpy()
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays: dict[str, Any] = {"features": out, "indices": indices} | {k: local[t] for t, k in zip(thresholds, wanted)}
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return {"global": out, "local": local}


def fit_head(model: ChestClassifier, cache: CropCache, train_set: CropDataset, val_set: CropDataset,
             sampler: BalancedSampler, pos_weight: np.ndarray, cfg: TrainConfig, out: Path,
             spec: ClinicalSpec | None = None, architecture: dict[str, Any] | None = None,
             select: tuple[str, ...] = SELECT_LABELS, deadline: float = float("inf")):
    """The linear-probe stage of transfer learning: the head alone (and a clinical model's
    embeddings), on features of the frozen network computed once (no augmentation). Same
    sampling, masked weighted loss, Adam, plateau schedule and within-source checkpoint choice as
    the full loop; features are standardised while fitting and the standardisation is folded into
    the first layer afterwards, so the saved model is the ordinary architecture.

    AG-CNN is trained in the paper's three stages with the branches frozen: (1) the global branch
    is ``--init``'s, (2) the local branch reads the attention box of each threshold in
    ``cfg.attention_thresholds``, (3) a fusion head is fitted per threshold, and the threshold
    with the best validation score is kept (recorded in ``architecture``). Each head fit saves
    its state every epoch and resumes from it. Returns (model, best score, epochs, best epoch)."""
    agcnn = model.local is not None
    thresholds = tuple(cfg.attention_thresholds) if agcnn else ()
    features = {name: branch_features(model, cache, part.indices, out / f"features_{name}.npz", thresholds)
                for name, part in (("train", train_set), ("val", val_set))}
    codes = {name: torch.from_numpy(spec.encode(table_records(cache.table.iloc[part.indices], spec.names)))
             for name, part in (("train", train_set), ("val", val_set))} if spec else None
    fits = {}
    for t in thresholds or (None,):
        x = {name: f["global"] if t is None else np.concatenate([f["global"], f["local"][t]], axis=1)
             for name, f in features.items()}
        fits[t] = _fit_head_once(model, x, codes, train_set, val_set, sampler, pos_weight, cfg, out,
                                 "" if t is None else f"_t{t:g}", select, deadline)
    chosen = max(fits, key=lambda t: fits[t]["score"] if np.isfinite(fits[t]["score"]) else -np.inf)
    fit = fits[chosen]
    model.head.load_state_dict(fit["state"]["head"])
    if model.clinical is not None:
        model.clinical.load_state_dict(fit["state"]["clinical"])
    if agcnn and architecture is not None:
        architecture.update({
            "attention_threshold": chosen,
            "threshold_validation_scores": {f"{t:g}": round(float(f["score"]), 4) for t, f in fits.items()},
            "local_branch": "DenseNet-121 on the attention box cut from the original image",
            "training": "stage-wise with frozen branches: global branch from --init, local branch a copy "
                        "of it, fusion head fitted per attention threshold; the threshold chosen on validation"})
    with torch.no_grad():  # fold (f - mean) / std into the image-feature columns of the first layer
        first, (mean, std) = head_linears(model.head)[0], fit["standardise"]
        width = len(mean)
        scale = torch.from_numpy(1.0 / std)
        first.bias.sub_(first.weight[:, :width] @ torch.from_numpy(mean * (1.0 / std)))
        first.weight[:, :width] *= scale[None, :]
    score = fit["score"]
    return model, (score if np.isfinite(score) else None), fit["epochs"], fit["best_epoch"]


def _fit_head_once(model: ChestClassifier, features: dict[str, np.ndarray], codes: dict[str, torch.Tensor] | None,
                   train_set: CropDataset, val_set: CropDataset, sampler: BalancedSampler,
                   pos_weight: np.ndarray, cfg: TrainConfig, out: Path, tag: str,
                   select: tuple[str, ...] = SELECT_LABELS, deadline: float = float("inf")) -> dict[str, Any]:
    """One head fit on fixed image features (+ clinical codes) through
    :class:`~pneumoscan.training.fit_loop.FitLoop`, resumable from ``head_state{tag}.pt``."""
    torch.manual_seed(cfg.seed)
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    z = {name: torch.from_numpy((f - mean) / std) for name, f in features.items()}
    head, clinical = model.head, model.clinical
    for layer in head_linears(head):
        layer.reset_parameters()  # a new head: the one loaded was fitted to another population
    modules: dict[str, torch.nn.Module] = {"head": head}
    if clinical is not None:
        for table in clinical.embeddings:
            table.reset_parameters()
        modules["clinical"] = clinical

    def head_input(name: str, rows: np.ndarray | slice, epoch: int, k: int) -> torch.Tensor:
        if clinical is None or codes is None:  # (codes come with a clinical model)
            return z[name][rows]
        c = codes[name][rows]
        if name == "train" and cfg.field_dropout > 0:
            c = drop_fields(c, cfg.field_dropout, torch.Generator().manual_seed(cfg.seed * 7 + epoch * 10_007 + k))
        return torch.cat([z[name][rows], clinical(c)], dim=1)

    # What a resumed fit must share with the one it continues (the epoch count may grow).
    settings = {"lr": cfg.lr, "betas": list(cfg.betas), "batch_size": cfg.batch_size, "seed": cfg.seed,
                "patience": cfg.patience, "epoch_size": len(sampler), "field_dropout": cfg.field_dropout,
                "features": list(features["train"].shape), "labels": train_set.labels.shape[0]}
    loop = FitLoop(modules, [p for m in modules.values() for p in m.parameters()], cfg, sampler, train_set, val_set,
                   pos_weight, select, out / f"head_state{tag}.pt", out / f"head_metrics{tag}.csv", settings)
    best = loop.run(lambda rows, epoch, k: head(head_input("train", rows, epoch, k)),
                    lambda: head(head_input("val", slice(None), 0, 0)), deadline)
    return best | {"standardise": (mean, std)}
