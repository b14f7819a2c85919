"""Saved models: weights plus everything needed to use them correctly, checked on every load.

A model file is a plain dict of tensors and JSON-able metadata, written with ``torch.save`` and
read with ``torch.load(weights_only=True)`` (no pickled code runs). The metadata names the model
kind, its label order, input size, preprocessing and training data, and a SHA-256 of the weights;
loading recomputes the hash and refuses a file whose weights, kind or label order do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that is missing, damaged, tampered with or meant for something else."""


def shipped_model_path(name: str) -> Path:
    """A model file shipped inside the package (``pneumoscan/models/``), or a clear error."""
    from importlib import resources

    path = Path(str(resources.files("pneumoscan") / "models" / name))
    if not path.exists():
        raise FileNotFoundError(f"the shipped model {name} is not installed at {path}")
    return path


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order (file-format free)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
               *, half: bool = False) -> dict[str, Any]:
    """Write atomically (temp file + rename, so a crash never leaves half a model).

    ``half`` stores floating-point weights as float16 (shipped models); they load back as float32.
    Returns the metadata as written, with ``weights_sha256`` filled in.
    """
    weights = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
               for k, v in state_dict.items()}
    meta = {**meta, "format_version": FORMAT_VERSION, "weights_sha256": weights_sha256(weights)}
    json.dumps(meta)  # metadata must stay plain JSON so weights_only loading can read it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"meta_json": json.dumps(meta), "state_dict": weights}, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return meta


def resumable_checkpoint(path: str | Path) -> str | None:
    """``path`` if a training checkpoint exists there and reads back whole, None if there is none;
    a damaged one (a crash mid-write, a full disk) is refused with what to do, never loaded."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "state_dict" not in blob or "epoch" not in blob:
            raise ValueError("no state_dict/epoch inside")
    except Exception as exc:
        raise ModelFileError(
            f"{path}: the checkpoint to resume from is damaged ({str(exc).splitlines()[0][:160]}); "
            f"move it away to restart from the previous best.ckpt, or pass --no-resume to start over"
        ) from exc
    return str(path)


def load_model(path: str | Path, *, kind: str, labels: tuple[str, ...] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a model file; returns (float32 state dict, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads, truncation and foreign formats all land here
        raise ModelFileError(
            f"{path}: not a loadable PneumoScan model file (refused by the safe loader: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(blob, dict) or "meta_json" not in blob or "state_dict" not in blob:
        raise ModelFileError(f"{path}: not a PneumoScan model file (no metadata block)")
    try:
        meta = json.loads(blob["meta_json"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: model metadata is not valid JSON") from exc
    if meta.get("kind") != kind:
        raise ModelFileError(f"{path}: is a {meta.get('kind')!r} model, expected {kind!r}")
    state = blob["state_dict"]
    actual = weights_sha256(state)
    if actual != meta.get("weights_sha256"):
        raise ModelFileError(
            f"{path}: weights do not match their recorded SHA-256 (file damaged or altered); "
            f"recorded {str(meta.get('weights_sha256'))[:12]}…, found {actual[:12]}…"
        )
    if labels is not None and tuple(meta.get("labels", ())) != tuple(labels):
        raise ModelFileError(
            f"{path}: label order {meta.get('labels')} differs from this version's {list(labels)}"
        )
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, meta
