"""Finalising a trained classifier: each label's assessed flag and threshold decided on the
validation rows, the validation figures and Grad-CAM's reference features recorded, and
``model.pt`` and ``val_report.json`` written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoscan.classify import Classifier
from pneumoscan.labels import LABELS
from pneumoscan.progress import note
from pneumoscan.training.cache import CropCache
from pneumoscan.training.data import mask_single_class_sources

#: Training films whose mean pooled features are Grad-CAM's reference (explain.py).
REFERENCE_FILMS = 512


def reference_films(rows: np.ndarray, sources: np.ndarray) -> tuple[np.ndarray, bool]:
    """Which of ``rows`` (one source name each) Grad-CAM's reference is the mean of: up to
    ``REFERENCE_FILMS`` drawn with seed 0, from the adult films when there are any (and whether
    there were)."""
    from pneumoscan.data.manifest import population

    adult = np.array([population(str(s)) == "adult" for s in sources], bool)
    pool = np.asarray(rows)[adult] if adult.any() else np.asarray(rows)
    return np.sort(np.random.default_rng(0).permutation(pool)[:REFERENCE_FILMS]), bool(adult.any())


def finalise(classifier: Classifier, cache: CropCache, rows: dict[str, np.ndarray], out: str | Path
             ) -> dict[str, Any]:
    """Decide each label's assessed flag and threshold on the validation rows, record the
    validation figures and Grad-CAM's reference features, and write ``model.pt`` and
    ``val_report.json`` into ``out``."""
    from tqdm import tqdm

    from pneumoscan.training.tables import (
        assess_labels,
        evaluate_probabilities,
        patient_keys,
    )

    table, out = cache.table, Path(out)
    val_probs = np.concatenate([
        classifier.predict_proba(cache.images(part).astype(np.float32) / 255.0, batch_size=64,
                                 **cache.scoring_inputs(classifier, part))
        for part in tqdm(np.array_split(rows["val"], max(1, len(rows["val"]) // 256)),
                         desc="finalise: scoring validation images", unit="chunk")])
    val_labels = table.iloc[rows["val"]][list(LABELS)].to_numpy(np.float32)
    val_sources = table.iloc[rows["val"]]["source"].astype(str).to_numpy()
    train_sources = table.iloc[rows["train"]]["source"].astype(str).to_numpy()
    train_labels, _ = mask_single_class_sources(  # count only the positives the loss saw
        table.iloc[rows["train"]][list(LABELS)].to_numpy(np.float32), train_sources)
    note("finalise: assessing each label (bootstrap CIs) and writing the model …")
    assessment = assess_labels(val_labels, val_probs, val_sources, train_labels, train_sources)
    classifier.set_assessment(assessment)
    sample, adult = reference_films(rows["train"], train_sources)
    with torch.inference_mode():
        pooled = [classifier.model.feature_map(torch.from_numpy(cache.images(part).astype(np.float32) / 255.0)[:, None])
                  .mean(dim=(2, 3)) for part in np.array_split(sample, max(1, len(sample) // 64))]
    classifier.set_cam_reference(torch.cat(pooled).mean(dim=0).numpy(),
                                 f"mean of {len(sample)} {'adult ' if adult else ''}training films")
    report = evaluate_probabilities(val_labels, val_probs, classifier.meta["thresholds"], split="val",
                                    sources=val_sources, patients=patient_keys(table.iloc[rows["val"]]))
    classifier.meta["validation"] = {"within_source": report["within_source"], "n_images": report["n_images"],
                                     "pooled_auc_not_a_finding_measure": report["auc"]}
    written = classifier.save(out / "model.pt")
    (out / "val_report.json").write_text(json.dumps(report, indent=2))
    return written
