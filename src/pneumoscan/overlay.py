"""Pictures for people: the X-ray with its lung contour and crop box drawn on it."""

from __future__ import annotations

import cv2
import numpy as np

from pneumoscan.enhance import to_uint8

LUNG_BGR = (80, 220, 80)
BOX_BGR = (40, 170, 255)


def segmentation_overlay(pixels: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int],
                         fallback: bool) -> np.ndarray:
    """BGR uint8 image: grey X-ray, lung contour in green, crop box in orange (dashed if the
    whole image is used because the lungs were not found)."""
    canvas = cv2.cvtColor(to_uint8(pixels), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(min(pixels.shape) / 256))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, LUNG_BGR, thickness, cv2.LINE_AA)
    x0, y0, x1, y1 = box
    if fallback:
        _dashed_rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, thickness)
    else:
        cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, thickness, cv2.LINE_AA)
    label = "lungs not found: whole image used" if fallback else "lung crop"
    scale = max(0.4, min(pixels.shape) / 700)
    cv2.putText(canvas, label, (8 + x0, max(20, y0 + int(28 * scale))), cv2.FONT_HERSHEY_SIMPLEX,
                scale, BOX_BGR, max(1, thickness), cv2.LINE_AA)
    return canvas


def _dashed_rectangle(canvas: np.ndarray, p0: tuple[int, int], p1: tuple[int, int],
                      colour: tuple[int, int, int], thickness: int) -> None:
    (x0, y0), (x1, y1) = p0, p1
    dash = max(6, 4 * thickness)
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = int(np.hypot(b[0] - a[0], b[1] - a[1]))
        for start in range(0, length, 2 * dash):
            t0, t1 = start / max(length, 1), min(start + dash, length) / max(length, 1)
            s = (int(a[0] + (b[0] - a[0]) * t0), int(a[1] + (b[1] - a[1]) * t0))
            e = (int(a[0] + (b[0] - a[0]) * t1), int(a[1] + (b[1] - a[1]) * t1))
            cv2.line(canvas, s, e, colour, thickness)


def findings_caption(result) -> str:
    """What the model says and what it does not assess, in words, for pictures people read."""
    quality = result.quality or {}
    reasons = "; ".join(quality.get("reasons") or [])
    if result.probabilities is None and reasons:
        return f"NOT SCORED: not a frontal chest X-ray ({reasons})"
    found = ", ".join(result.findings) if result.findings else "none above threshold"
    line = f"Findings: {found}"
    if quality.get("forced"):
        line = f"FORCED: the input gate refused this image ({reasons}); scored anyway\n" + line
    if result.not_assessed:
        names = ", ".join(result.not_assessed) if len(result.not_assessed) <= 4 else \
            f"{len(result.not_assessed)} of 15 labels"
        line += f"\nNot assessed by this model: {names}"
    return line


def prediction_figure(pixels: np.ndarray, mask: np.ndarray | None, box: list[int] | None,
                      fallback: bool, cam: np.ndarray | None, cam_label: str | None,
                      probability: float | None, path: str, max_side: int = 1024,
                      caption: str | None = None) -> None:
    """Save a PNG: the X-ray with lung contour, crop box and (if given) the Grad-CAM heat map
    with a colour bar and the class name; ``caption`` (findings, labels not assessed) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = min(1.0, max_side / max(pixels.shape))
    if scale < 1.0:  # draw at most max_side pixels: the figure is for eyes, not measurements
        size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        mask = None if mask is None else cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        cam = None if cam is None else cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR)
        box = None if box is None else [round(v * scale) for v in box]
    height, width = pixels.shape
    fig, ax = plt.subplots(figsize=(7.5, 7.5 * height / width + 0.4), dpi=110)
    ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
    if cam is not None:
        heat = ax.imshow(np.ma.masked_less(cam, 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label("Grad-CAM (relative importance)")
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors=["#50dc50"], linewidths=1.0)
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#ffaa28",
                                   linewidth=1.5, linestyle="--" if fallback else "-"))
    title = "lungs not found: whole image used" if fallback else "lung crop"
    if cam_label is not None:
        title = f"Grad-CAM: {cam_label}" + (f" (p = {probability:.2f})" if probability is not None else "") + f" · {title}"
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    if caption:
        ax.text(0.0, -0.01, caption, transform=ax.transAxes, fontsize=9, va="top", ha="left",
                wrap=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
