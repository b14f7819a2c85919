"""The models a :class:`~pneumoscan.predict.Predictor` runs, loaded from their checked files on a
backend (ONNX Runtime or PyTorch), with the heart model and the input gate's learnt check that
belongs to the lung model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pneumoscan.classify import Classifier, ScoringClassifier
from pneumoscan.segment import HeartSegmenter, LungSegmenter

BACKENDS = ("auto", "onnx", "torch")


def heart_model_path(path: str | Path | None = None) -> Path | None:
    """``path``, else the shipped heart model; None if none is installed (the predictions then
    carry no cardiothoracic ratio)."""
    from pneumoscan.segment import default_heart_model_path

    if path is not None:
        return Path(path)
    try:
        return default_heart_model_path()
    except FileNotFoundError:
        return None


def load_heart(path: str | Path | None = None, device: str = "cpu") -> HeartSegmenter | None:
    """The heart model (:func:`heart_model_path`) in PyTorch on ``device``, or None."""
    found = heart_model_path(path)
    return None if found is None else HeartSegmenter.load(found).to(device)


def load_models(seg: str | Path | None = None, cls_model: str | Path | None = None, *, backend: str = "auto",
                device: str = "cpu", progress: Callable[[str], None] | None = None,
                heart: str | Path | None = None, with_heart: bool = True
                ) -> tuple[LungSegmenter, ScoringClassifier, HeartSegmenter | None]:
    """The lung model, the classifier and (``with_heart``) the heart model (:func:`heart_model_path`),
    verified from their files, then on ``backend``: ``onnx`` (ONNX Runtime, exported once per
    set of model files into the per-user cache, and from then on loaded without building the
    PyTorch networks), ``torch`` (PyTorch on ``device``), or ``auto``: ONNX Runtime on the CPU when
    it is installed (about twice PyTorch's speed here, same outputs to 1e-4), PyTorch otherwise
    or on a GPU."""
    from pneumoscan.classify import default_model_path as default_classifier
    from pneumoscan.segment import default_model_path as default_segmenter

    check_backend(backend, device)
    seg_path = Path(seg) if seg else default_segmenter()
    cls_path = Path(cls_model) if cls_model else default_classifier()
    heart_path = heart_model_path(heart) if with_heart else None
    if backend == "auto":
        backend = "onnx" if str(device) == "cpu" and _onnx_installed() else "torch"
    if backend == "onnx":
        from pneumoscan.backends.onnx import load_cached

        return load_cached(seg_path, cls_path, heart_path, progress=progress)
    return (LungSegmenter.load(seg_path).to(device), Classifier.load(cls_path).to(device),
            load_heart(heart_path, device) if heart_path else None)


def check_backend(backend: str, device: str) -> None:
    """Refuse a backend or device this machine cannot give (ValueError, one sentence) before any
    model loads: :func:`load_models` asks first, and so does ``predict`` before it reads inputs."""
    from pneumoscan.accel import resolve_device

    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "onnx":
        if str(device) != "cpu":
            raise ValueError("--backend onnx runs on the CPU; use --backend torch for --device cuda")
        if not _onnx_installed():
            raise ValueError("--backend onnx needs the onnx extra: pip install 'pneumoscan[onnx]'")
    resolve_device(device)


def _onnx_installed() -> bool:
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("onnx", "onnxruntime"))
