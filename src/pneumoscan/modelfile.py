"""Saved models: weights plus everything needed to use them correctly, checked on every load.

A model file is a plain dict of tensors and JSON-able metadata, written with ``torch.save`` and
read with ``torch.load(weights_only=True)`` (no pickled code runs). The metadata names the model
kind, its label order, input size, preprocessing and training data, a SHA-256 of the weights
(``weights_sha256``, the model's identity: other models and reports name it) and a SHA-256 over
those weights *and* the metadata (``sha256``), so that a changed threshold or label flag is caught
as surely as a changed weight. Loading recomputes both and refuses a file whose weights, metadata,
kind or label order do not match. Files written before ``sha256`` existed (format 1) are checked
on their weights and loaded with a one-time warning that their metadata is unprotected.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from pneumoscan.errors import PneumoScanError, first_line

FORMAT_VERSION = 2
_WARNED: set[str] = set()


class ModelFileError(PneumoScanError, ValueError):
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


def metadata_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the metadata (which holds the weights' hash), leaving
    out only this hash itself."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write under a temporary name, (fsync,) rename: a crash or a full disk never leaves half a
    file under the final name, and the temporary file is removed when writing fails. ``sync``
    False skips the fsync where losing the file on a power cut is acceptable (pictures)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    meta = json.loads(json.dumps(meta))  # plain JSON (weights_only loading reads it back as such)
    meta["sha256"] = metadata_sha256(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"meta_json": json.dumps(meta), "state_dict": weights}, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return meta


def load_error(exc: Exception) -> str:
    """What a failed ``load_state_dict`` says that matters, in one line: its first "size
    mismatch" (PyTorch's first line only names the module)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
    return (mismatch or (lines[0] if lines else type(exc).__name__))[:240]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning training checkpoint, read by the safe loader; a ValueError when what is there
    holds no weights and epoch (other errors are the loader's own)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "epoch" not in blob:
        raise ValueError("no state_dict/epoch inside")
    return blob


def resumable_checkpoint(path: str | Path) -> str | None:
    """``path`` if a training checkpoint exists there and reads back whole, None if there is none;
    a damaged one (a crash mid-write, a full disk) is refused with what to do, never loaded."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        read_checkpoint(path)
    except Exception as exc:
        raise ModelFileError(
            f"{path}: the checkpoint to resume from is damaged ({first_line(exc, 160)}); "
            f"move it away to restart from the previous best.ckpt, or pass --no-resume to start over"
        ) from exc
    return str(path)


def checkpoint_callbacks(dirpath: str | Path, monitor: str, mode: str = "max") -> tuple[Any, Any]:
    """(best, last): Lightning checkpoints of the best epoch by ``monitor`` (``best.ckpt``) and of
    every epoch's end (``last.ckpt``, what :func:`resumable_checkpoint` resumes from).

    Why two: Lightning 2.6 writes ``save_last`` only when the monitored checkpoint is saved too,
    so after an epoch that did not improve, last.ckpt still held the best epoch and a resumed run
    repeated the epochs since (a CPU run lost a 30-minute epoch that way)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = ModelCheckpoint(dirpath=dirpath, filename="best", monitor=monitor, mode=mode, save_top_k=1)
    return best, _last_checkpoint(dirpath)


def _last_checkpoint(dirpath: str | Path, **trigger: Any) -> Any:
    """A Lightning checkpoint that overwrites ``last.ckpt`` (at every epoch's end unless
    ``trigger`` names another of ModelCheckpoint's triggers)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False, **trigger)


def timed_checkpoint(dirpath: str | Path, minutes: float) -> Any:
    """A Lightning checkpoint written to ``last.ckpt`` every ``minutes`` of training in the middle of
    an epoch (with a stateful loader, :class:`~pneumoscan.training.data.ResumableLoader`, a resume
    continues at the next batch): a killed hour-long CPU epoch loses at most ``minutes``."""
    from datetime import timedelta

    return _last_checkpoint(dirpath, train_time_interval=timedelta(minutes=minutes))


def load_model(path: str | Path, *, kind: str, labels: tuple[str, ...] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a model file; returns (float32 state dict, metadata)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a regular file (a folder, a device or a pipe): give a model file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the model file is empty (0 bytes)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads, truncation and foreign formats all land here
        raise ModelFileError(
            f"{path}: not a loadable PneumoScan model file (refused by the safe loader: "
            f"{first_line(exc)})"
        ) from exc
    if not isinstance(blob, dict) or "meta_json" not in blob or "state_dict" not in blob:
        raise ModelFileError(f"{path}: not a PneumoScan model file (no metadata block)")
    try:
        meta = json.loads(blob["meta_json"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: model metadata is not valid JSON") from exc
    state = blob["state_dict"]
    if not isinstance(meta, dict) or not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelFileError(f"{path}: not a PneumoScan model file (metadata or weights malformed)")
    if meta.get("kind") != kind:
        raise ModelFileError(f"{path}: is a {meta.get('kind')!r} model, expected {kind!r}")
    actual = weights_sha256(state)
    if actual != meta.get("weights_sha256"):
        raise ModelFileError(
            f"{path}: weights do not match their recorded SHA-256 (file damaged or altered); "
            f"recorded {str(meta.get('weights_sha256'))[:12]}…, found {actual[:12]}…"
        )
    if meta.get("format_version", 1) != 1:
        if meta.get("sha256") != metadata_sha256(meta):
            raise ModelFileError(f"{path}: metadata does not match its recorded SHA-256 (a threshold, "
                                 f"label flag or other setting was altered, or the file is damaged)")
    elif str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(f"{path}: an older model file (format 1): its weights are verified but its "
                      f"metadata (thresholds, labels) is not protected by a hash; re-save it with "
                      f"this version", stacklevel=2)
    if labels is not None and tuple(meta.get("labels", ())) != tuple(labels):
        raise ModelFileError(
            f"{path}: label order {meta.get('labels')} differs from this version's {list(labels)}"
        )
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, meta
