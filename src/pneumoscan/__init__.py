"""PneumoScan: chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM."""

from pneumoscan.labels import FINDINGS, LABELS

__version__ = "0.1.0"
__all__ = ["FINDINGS", "LABELS", "__version__"]
