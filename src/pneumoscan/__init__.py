"""PneumoScan: chest X-ray findings with lung and heart segmentation, DenseNet-121 and Grad-CAM.

The public face, in the manner of torchxrayvision::

    import pneumoscan
    predictor = pneumoscan.Predictor.from_default()
    result = predictor.predict(pneumoscan.read_xray("film.png"))

``Predictor`` and ``Prediction`` load on first use (they bring in PyTorch), so importing the
package for ``LABELS`` stays light.
"""

from pneumoscan.labels import FINDINGS, LABELS

__version__ = "0.1.0"
__all__ = ["FINDINGS", "LABELS", "Prediction", "Predictor", "XrayReadError", "__version__", "read_xray"]

_LAZY = {"Predictor": "pneumoscan.predict", "Prediction": "pneumoscan.predict",
         "read_xray": "pneumoscan.films", "XrayReadError": "pneumoscan.films"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pneumoscan' has no attribute {name!r}")
