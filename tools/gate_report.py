"""How the input gate does on real frontal films and on images that are not frontal chest X-rays.

    python tools/gate_report.py [--per-source 300] [--out runs/gate] [--rules]

Positives: the frontal films of every source in ../shared/data (a seeded sample of at most
``--per-source`` images each; 0 = all). Negatives: scikit-image's bundled sample photographs,
the CT/MR/US/NM/PT/RT files bundled with pydicom, the lateral views of the COVID-19 collection,
and films of the dev set rotated by 90°, 180° and 270°, inverted, and replaced by blank, noise
and gradient images of the same size. Prints one table (accepted / refused per set) and writes
every measured value to OUT/measures.csv. The gate is the shipped one (learnt check), or with
``--rules`` the rules alone. Most of these images were used to fit the learnt check, so its rows
here are in-sample: the honest (out-of-fold) figures are ``tools/gate_fit.py``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PNEUMOSCAN_DATA", REPO.parent / "shared" / "data"))
NON_RADIOGRAPH = ("CT", "MR", "US", "NM", "PT", "RTIMAGE", "RTDOSE", "RTSTRUCT", "RTPLAN")


def positives(per_source: int, seed: int = 0) -> list[tuple[str, str]]:
    from pneumoscan.data import build_manifest, resolve_sources

    table = build_manifest({k: v for k, v in resolve_sources(DATA).items() if k != "rsna"})
    table = table[~table.view.str.upper().isin({"L", "LL", "RL", "LATERAL"})]
    rows = []
    for source, part in table.groupby("source"):
        if per_source and len(part) > per_source:
            part = part.sample(per_source, random_state=seed)
        rows += [(f"frontal: {source}", p) for p in part.path]
    siim = sorted((DATA / "siim-acr-pneumothorax").rglob("*.dcm"))
    return rows + [("frontal: siim (DICOM)", str(p)) for p in siim]


def negatives(films: list[str]) -> list[tuple[str, object]]:
    """(set name, path or (name, array)) for every non-chest input."""
    import cv2
    import pydicom
    import skimage.data
    from pydicom.data import get_testdata_files

    from pneumoscan.films import XrayReadError, read_xray

    out: list[tuple[str, object]] = []
    for name in sorted(skimage.data.__all__):
        if name in ("data_dir", "download_all", "file_hash", "lbp_frontal_face_cascade_filename", "lfw_subset"):
            continue
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # needs a download, or is not an image
            continue
        image = image[0] if isinstance(image, tuple) else image
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = cv2.cvtColor(image[..., :3].astype(np.uint8), cv2.COLOR_RGB2GRAY)
        if image.ndim != 2 or min(image.shape) < 64:
            continue
        image = image.astype(np.float32)
        if image.max() > image.min():
            out.append(("photo: scikit-image", (name, (image - image.min()) / (image.max() - image.min()))))
    for path in get_testdata_files():
        try:
            modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "")).upper()
        except Exception:
            continue
        if modality in NON_RADIOGRAPH:
            out.append((f"DICOM: pydicom {modality}", path))
    covid = pd.read_csv(DATA / "covid-chestxray" / "metadata.csv")
    for name in covid.loc[covid.view.astype(str).str.upper().isin({"L", "LATERAL"}), "filename"]:
        path = DATA / "covid-chestxray" / "images" / name
        if path.exists():
            out.append(("lateral: COVID-19 collection", str(path)))
    rng = np.random.default_rng(0)
    for path in films:
        try:
            pixels = read_xray(path).pixels
        except XrayReadError:
            continue
        name = Path(path).name
        out += [("film rotated 90°", (name, np.rot90(pixels).copy())),
                ("film rotated 180°", (name, np.rot90(pixels, 2).copy())),
                ("film rotated 270°", (name, np.rot90(pixels, 3).copy())),
                ("film inverted", (name, 1.0 - pixels)),
                ("blank (grey + 1 % noise)", (name, np.clip(0.5 + 0.01 * rng.standard_normal(pixels.shape), 0, 1)
                                              .astype(np.float32))),
                ("noise", (name, rng.random(pixels.shape, dtype=np.float32))),
                ("gradient", (name, np.tile(np.linspace(0, 1, pixels.shape[1], dtype=np.float32),
                                             (pixels.shape[0], 1))))]
    return out


def load(item: object) -> tuple[str, np.ndarray, dict | None]:
    """(name, [0, 1] pixels, DICOM tags or None) of a path or a (name, array) pair from
    :func:`positives` / :func:`negatives`; XrayReadError when a file cannot be read."""
    from pneumoscan.films import read_xray

    if isinstance(item, tuple):
        return item[0], item[1], {}
    image = read_xray(item)
    return str(item), image.pixels, image.meta


def summarise(table: pd.DataFrame, how: str = "") -> pd.DataFrame:
    """Print accepted (frontal) / refused (others) per set from ``frontal`` and ``accepted``
    columns, then both overall rates; returns the table printed. ``how`` says how the verdicts
    were made (e.g. "out of fold")."""
    summary = table.groupby(["frontal", "set"]).agg(images=("accepted", "size"), accepted=("accepted", "sum"))
    summary["refused"] = summary.images - summary.accepted
    summary["rate"] = np.where(summary.index.get_level_values(0), summary.accepted / summary.images,
                               summary.refused / summary.images)
    summary = summary.reset_index().sort_values(["frontal", "set"], ascending=[False, True])
    summary["rate"] = summary.rate.map(lambda v: f"{v:.1%}")
    heading = "accepted (frontal) / refused (others)" + (f", {how}" if how else "")
    print(summary.rename(columns={"rate": heading}).to_string(index=False))
    pos_rate = table[table.frontal].accepted.mean()
    neg_rate = 1 - table[~table.frontal].accepted.mean()
    print(f"\n{how + ': ' if how else ''}frontal films accepted: {pos_rate:.1%} of {int(table.frontal.sum())}; "
          f"non-chest refused: {neg_rate:.1%} of {int((~table.frontal).sum())}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-source", type=int, default=300)
    parser.add_argument("--films", type=int, default=40, help="dev films to rotate, invert, replace")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gate")
    parser.add_argument("--rules", action="store_true", help="the rules alone, without the learnt check")
    args = parser.parse_args()
    from tqdm import tqdm

    from pneumoscan.gate import check_frontal_chest, load_default_check
    from pneumoscan.films import XrayReadError
    from pneumoscan.segment import load_default

    segmenter = load_default()
    learnt = None if args.rules else load_default_check()
    pos = positives(args.per_source)
    films = [p for s, p in pos if "nih" in s or "shenzhen" in s or "montgomery" in s][:: max(1, len(pos) // args.films)]
    items = [(s, p, True) for s, p in pos] + [(s, p, False) for s, p in negatives(films[: args.films])]
    records = []
    for group, item, frontal in tqdm(items, unit="img", desc="gate"):
        try:
            name, pixels, meta = load(item)
        except XrayReadError as exc:
            records.append({"set": group, "item": str(item), "frontal": frontal, "accepted": False,
                            "reasons": f"unreadable: {str(exc)[:80]}"})
            continue
        prob = segmenter.probabilities([pixels])[0]
        result = check_frontal_chest(prob, pixels, meta, learnt)
        records.append({"set": group, "item": name, "frontal": frontal, "accepted": result.frontal_chest,
                        "reasons": "; ".join(result.reasons), **result.measures})
    table = pd.DataFrame(records)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "measures.csv", index=False)
    summarise(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
