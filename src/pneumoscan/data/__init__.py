"""Data sources (one module each, original layouts) and the merged patient-wise manifest."""

from pneumoscan.data.actualmed import Actualmed
from pneumoscan.data.base import SourceError, XraySource
from pneumoscan.data.covid import CovidChestXray
from pneumoscan.data.exclude import Exclusions, drop_excluded
from pneumoscan.data.jsrt import JSRT
from pneumoscan.data.kermany import Kermany
from pneumoscan.data.manifest import (
    DEFAULT_FRACTIONS,
    DEFAULT_SEED,
    MANIFEST_COLUMNS,
    SOURCES,
    ManifestError,
    build_manifest,
    label_matrix,
    patient_leaks,
    population,
    read_manifest,
    resolve_sources,
    summarize,
    write_manifest,
)
from pneumoscan.data.montgomery import Montgomery
from pneumoscan.data.nih import NIH
from pneumoscan.data.nih_masked import NIHMasked
from pneumoscan.data.rsna import RSNA
from pneumoscan.data.shenzhen import Shenzhen

__all__ = [
    "Actualmed", "CovidChestXray", "DEFAULT_FRACTIONS", "DEFAULT_SEED", "Exclusions", "JSRT", "Kermany",
    "MANIFEST_COLUMNS", "ManifestError", "Montgomery", "NIH", "NIHMasked", "RSNA", "SOURCES", "Shenzhen",
    "SourceError", "XraySource", "build_manifest", "drop_excluded", "label_matrix", "patient_leaks", "population",
    "read_manifest", "resolve_sources", "summarize", "write_manifest",
]
