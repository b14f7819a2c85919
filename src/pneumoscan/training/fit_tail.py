"""The last dense blocks and the head fine-tuned (``train --train-from denseblock3`` or
``denseblock4``), the earlier layers frozen and their output computed once: about ten times the
every-layer speed on a CPU; resumable mid-epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoscan.networks import ChestClassifier
from pneumoscan.progress import note
from pneumoscan.training.cache import CropCache
from pneumoscan.training.config import TrainConfig
from pneumoscan.training.data import BalancedSampler, CropDataset
from pneumoscan.training.fit_state import SAVE_EVERY, save_fit_state, saved_fit_state
from pneumoscan.training.loss import masked_bce
from pneumoscan.training.metrics import selection_score

#: Blocks a partial fine-tune may start from (earlier layers frozen, their output computed once).
TRAIN_FROM = ("denseblock3", "denseblock4")


def split_backbone(model: ChestClassifier, start: str) -> tuple[torch.nn.Sequential, torch.nn.Sequential]:
    """DenseNet-121's feature layers before ``start`` (frozen: the stem) and from it on (trained:
    the tail, which ends with ``norm5``); both share the model's own modules."""
    features = model.net.features
    names = [name for name, _ in features.named_children()]
    if start not in TRAIN_FROM:
        raise ValueError(f"--train-from must be one of {', '.join(TRAIN_FROM)}, got {start!r}")
    k = names.index(start)
    return (torch.nn.Sequential(*[getattr(features, n) for n in names[:k]]),
            torch.nn.Sequential(*[getattr(features, n) for n in names[k:]]))


def stem_features(model: ChestClassifier, stem: torch.nn.Module, cache: CropCache, indices: np.ndarray,
                  path: Path, batch: int = 32, deadline: float = float("inf")) -> np.ndarray:
    """The frozen stem's output for cache rows (float16, memory-mapped in ``path``), computed once
    and resumable: ``path.json`` records how many rows are done, written after the rows. Past
    ``deadline`` it stops with what is done saved, and says so."""
    from tqdm import tqdm

    mark = path.with_suffix(".json")
    model.eval()
    with torch.inference_mode():
        shape = tuple(stem(model.normalise(torch.zeros(1, 1, cache.size, cache.size))).shape[1:])
    info = {"rows": int(len(indices)), "shape": list(shape), "indices_sha256": _digest(indices)}
    done = 0
    if path.exists() and mark.exists():
        saved = json.loads(mark.read_text())
        if {k: saved.get(k) for k in info} == info:
            done = int(saved["done"])
    if done == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(indices), *shape)).flush()
    array = np.load(path, mmap_mode="r+")
    with torch.inference_mode(), tqdm(total=len(indices), initial=done, desc=f"frozen layers {path.stem}",
                                      unit="img") as bar:
        for start in range(done, len(indices), batch):
            rows = indices[start:start + batch]
            x = torch.from_numpy(cache.images(rows).astype(np.float32) / 255.0)[:, None]
            x = model.normalise(x).contiguous(memory_format=torch.channels_last)  # about 1.5× faster on CPU
            array[start:start + len(rows)] = stem(x).float().numpy().astype(np.float16)
            late = time.time() > deadline
            if (start // batch) % 20 == 19 or start + batch >= len(indices) or late:
                array.flush()
                mark.write_text(json.dumps(info | {"done": start + len(rows)}))
            bar.update(len(rows))
            if late and start + batch < len(indices):
                raise ValueError(f"--max-minutes ran out while computing the frozen layers' output "
                                 f"({start + len(rows)} of {len(indices)} images done and kept); rerun "
                                 f"the same command to go on")
    return np.load(path, mmap_mode="r")


def _digest(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()


def fit_tail(model: ChestClassifier, cache: CropCache, train_set: CropDataset, val_set: CropDataset,
             sampler: BalancedSampler, pos_weight: np.ndarray, cfg: TrainConfig, out: Path,
             select: tuple[str, ...], deadline: float = float("inf")):
    """Fine-tune the last dense blocks and the head (``cfg.train_from`` onwards) on the frozen
    stem's output, computed once: on a 2-core CPU the stem is most of DenseNet-121's cost, so
    training from ``denseblock3`` runs at about 20 images/s against 3 for every layer.

    Same sampling, masked weighted loss, Adam, plateau schedule and within-source checkpoint
    choice as the full loop; no augmentation (the stem's output is fixed). Resumes exactly from
    ``tail_state.pt``, saved every ``SAVE_EVERY`` batches and at each epoch's end: the batch
    order and dropout draw from (seed, epoch, batch) alone. Returns (model, best score, epochs,
    best epoch)."""
    import csv

    from tqdm import tqdm

    stem, tail = split_backbone(model, cfg.train_from)
    x = {name: stem_features(model, stem, cache, part.indices, out / f"stem_{cfg.train_from}_{name}.npy",
                             deadline=deadline)
         for name, part in (("train", train_set), ("val", val_set))}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for module in (tail, model.head) for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)

    def logits(h: torch.Tensor) -> torch.Tensor:
        return model.net.class_layers(tail(h))

    y_train, y_val = torch.from_numpy(train_set.labels), torch.from_numpy(val_set.labels)
    weight = torch.from_numpy(pos_weight)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.patience)
    state_path = out / "tail_state.pt"
    settings = {"lr": cfg.lr, "betas": list(cfg.betas), "batch_size": cfg.batch_size, "seed": cfg.seed,
                "patience": cfg.patience, "epoch_size": len(sampler), "train_from": cfg.train_from,
                "init": cfg.init, "labels": int(train_set.labels.shape[0]), "select": list(select),
                "view_balance": cfg.view_balance}
    best: dict[str, Any] = {"score": -np.inf, "state": None, "best_epoch": 0}
    epoch, first_batch = 0, 0
    state = saved_fit_state(state_path, settings, cfg.resume, "fit")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        plateau.load_state_dict(state["plateau"])
        best, epoch, first_batch = state["best"], state["epoch"], state["batch"]

    def save(next_epoch: int, next_batch: int) -> None:
        save_fit_state(state_path, {"epoch": next_epoch, "batch": next_batch, "settings": settings,
                                    "model": model.state_dict(), "opt": opt.state_dict(),
                                    "plateau": plateau.state_dict(), "best": best})

    log_path = out / "tail_metrics.csv"
    stopped = False
    with open(log_path, "a" if log_path.exists() and cfg.resume else "w", newline="") as handle:
        log = csv.writer(handle)
        if handle.tell() == 0:
            log.writerow(["epoch", "train_loss", "val_loss", "val_select", "parts", "seconds"])
        while epoch < cfg.epochs and not stopped:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
            batches = range(0, len(order), cfg.batch_size)
            tail.train()
            model.head.train()
            losses, t0 = [], time.time()
            for k in tqdm(range(first_batch, len(batches)), desc=f"epoch {epoch}", unit="batch"):
                torch.manual_seed(cfg.seed * 1_000_003 + epoch * 10_007 + k)  # dropout replays exactly
                rows = order[batches[k]:batches[k] + cfg.batch_size].numpy()
                h = torch.from_numpy(np.asarray(x["train"][np.sort(rows)], np.float32))
                h = h[np.argsort(np.argsort(rows))]  # memory-map reads in file order, batch in draw order
                loss = masked_bce(logits(h), y_train[rows], weight,
                                  None if train_set.weights is None else torch.from_numpy(train_set.weights[rows]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if (k + 1) % SAVE_EVERY == 0:
                    save(epoch, k + 1)
                if time.time() > deadline:
                    save(epoch, k + 1)
                    stopped = True
                    break
            if stopped:
                break
            tail.eval()
            model.head.eval()
            with torch.no_grad():
                val_logits = torch.cat([logits(torch.from_numpy(np.asarray(x["val"][i:i + 128], np.float32)))
                                        for i in range(0, len(x["val"]), 128)])
                val_loss = float(masked_bce(val_logits, y_val, weight))
            score, parts = selection_score(val_set.labels, torch.sigmoid(val_logits).numpy(), val_set.sources,
                                           select)
            plateau.step(val_loss)
            log.writerow([epoch, round(float(np.mean(losses)) if losses else float("nan"), 5), round(val_loss, 5),
                          round(score, 5), json.dumps({k: round(v, 4) for k, v in parts.items()}),
                          round(time.time() - t0, 1)])
            handle.flush()
            if best["state"] is None or not np.isfinite(best["score"]) or score > best["score"]:
                best = {"score": float(score), "best_epoch": epoch,
                        "state": {k: v.clone() for k, v in model.state_dict().items()}}
            epoch, first_batch = epoch + 1, 0
            save(epoch, 0)
            note(f"epoch {epoch - 1}: train loss {np.mean(losses):.4f}, val loss {val_loss:.4f}, "
                 f"selection {score:.4f} (best {best['score']:.4f}, epoch {best['best_epoch']})")
    if best["state"] is None:
        raise ValueError("the time limit ended the fit before one epoch was validated; allow more "
                         "--max-minutes (the run resumes where it stopped)")
    model.load_state_dict(best["state"])
    for p in model.parameters():
        p.requires_grad_(True)
    score = best["score"]
    return model, (score if np.isfinite(score) else None), epoch, best["best_epoch"]
