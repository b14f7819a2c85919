"""Deployment: ``export`` (the models for ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pneumoscan.apps.cli.common import (
    app,
    console,
    fail,
)
from pneumoscan.errors import PneumoScanError


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
        from pneumoscan.classify import Classifier
    except (PneumoScanError, FileNotFoundError) as exc:
        fail(str(exc))
    except ImportError:
        fail("export needs the onnx extra: pip install 'pneumoscan[onnx]'")
    if not isinstance(predictor.classifier, Classifier):  # (loaded with backend="torch" above)
        fail("export needs the PyTorch classifier")
    paths = export_onnx(predictor.segmenter, predictor.classifier, out, heart=predictor.heart)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
