"""Pictures for people: the X-ray with its lung contour, crop box, heart outline and ratio, and one
panel per explained finding (its Grad-CAM), with captions that say what each shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pneumoscan.enhance import to_uint8

if TYPE_CHECKING:
    from pneumoscan.measure import Measurements
    from pneumoscan.prediction import Prediction

LUNG_BGR = (80, 220, 80)
BOX_BGR = (40, 170, 255)
LOCAL_BGR = (255, 60, 255)
REGION_BGR = (255, 255, 0)
HEART_BGR = (60, 60, 255)
#: A heat map of a class below its threshold is drawn this faintly: it draws the eye less.
MUTED_ALPHA = 0.18


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


def findings_caption(result: Prediction) -> str:
    """What the model says and what it does not assess, in words, for pictures people read."""
    quality = result.quality
    reasons = "; ".join(quality.reasons) if quality else ""
    if result.probabilities is None and reasons:
        return f"NOT SCORED: {(quality.refused_as if quality else None) or 'not a frontal chest X-ray'} ({reasons})"
    found = ", ".join(result.findings) if result.findings else "none above threshold"
    line = f"Findings: {found}"
    if quality and quality.forced:
        line = f"FORCED: the input gate refused this image ({reasons}); scored anyway\n" + line
    if result.not_assessed:
        names = ", ".join(result.not_assessed) if len(result.not_assessed) <= 4 else \
            f"{len(result.not_assessed)} of 15 labels"
        line += f"\nNot assessed by this model: {names}"
    outlined = [label for label, e in (result.cams or {}).items() if e.method == "outlines"]
    if outlined:
        line += f"\n{', '.join(outlined)}: explained by the heart outline (red) and the thoracic width (green)"
    if result.measurements and result.measurements.call_note:
        line += f"\nCardiomegaly {result.measurements.call_note}"
    if result.mask_quality:
        line += "\n" + result.mask_quality.caption()
    return line


FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_BGR = (235, 235, 235)


def heat_blend(canvas: np.ndarray, cam: np.ndarray, alpha: float = 0.45, floor: float = 0.05) -> np.ndarray:
    """The Grad-CAM map in the jet colour map over a BGR picture, where it is at least ``floor``."""
    heat = cv2.applyColorMap(to_uint8(np.clip(cam, 0, 1)), cv2.COLORMAP_JET)
    where = cam >= floor
    out = canvas.copy()
    out[where] = cv2.addWeighted(canvas, 1 - alpha, heat, alpha, 0)[where]
    return out


def wrap_text(text: str, width: int, scale: float) -> list[str]:
    """Lines of ``text`` (which may hold newlines) that fit ``width`` pixels in :data:`FONT`."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and cv2.getTextSize(trial, FONT, scale, 1)[0][0] > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


#: Films smaller than this on their long side are drawn enlarged, so that titles and captions fit.
MIN_SIDE = 640


def prediction_picture(pixels: np.ndarray, mask: np.ndarray | None, box: list[int] | None, fallback: bool,
                       cam: np.ndarray | None, cam_label: str | None, probability: float | None,
                       max_side: int = 1024, caption: str | None = None,
                       local_box: list[int] | None = None, threshold: float | None = None,
                       region: list[int] | None = None, heart: np.ndarray | None = None,
                       measurements: Measurements | None = None, why: str | None = None) -> np.ndarray:
    """BGR uint8 picture for people: the X-ray (drawn between :data:`MIN_SIDE` and ``max_side``
    on its long side) with lung contour, crop box (dashed when the whole image was used), an
    AG-CNN model's local box (what its local branch read, in magenta) and, if given, the Grad-CAM
    heat map with a colour bar and its region outlined in cyan; the heart outline and width in
    red, the thoracic width in green (``measurements``, :mod:`pneumoscan.measure`); the title
    (wrapped to the picture's width) says the class, its probability against its ``threshold``,
    whether it was called and ``why`` it is shown (a map of a class not called is drawn muted);
    ``caption`` (findings, labels not assessed, the ratio, mask quality) below. OpenCV only: about
    10 ms, where the same figure in matplotlib took 0.44 s."""
    long_side = max(pixels.shape)
    scale = max_side / long_side if long_side > max_side else max(1.0, MIN_SIDE / long_side)
    layers = _scaled(Layers(pixels, mask, box, local_box, region, cam, heart), scale)
    ratio = measurements.ratio if measurements is not None else None
    ctr_lines = [[round(v * scale) for v in line] for line in (ratio.heart_line, ratio.thorax_line)
                 if line] if ratio is not None and ratio.value is not None else []
    called = probability is not None and threshold is not None and probability >= threshold
    muted = probability is not None and threshold is not None and not called
    film = _drawn_film(layers, fallback, muted, ctr_lines)
    title = _title(cam_label, probability, threshold, called, why, layers.cam, fallback, local_box is not None)
    if measurements is not None:
        caption = (caption + "\n" if caption else "") + ctr_caption(measurements)
    if cam is not None:
        caption = (caption + "\n" if caption else "") + ("Colour bar: Grad-CAM relative to this map's maximum "
                                                         "(not a probability); cyan: where it reaches half of it")
    return _framed(film, title, caption, with_bar=cam is not None)


@dataclass
class Layers:
    """What is drawn on the film, in the film's pixels (boxes as [x0, y0, x1, y1])."""

    pixels: np.ndarray
    mask: np.ndarray | None
    box: list[int] | None
    local_box: list[int] | None
    region: list[int] | None
    cam: np.ndarray | None
    heart: np.ndarray | None


def _scaled(layers: Layers, scale: float) -> Layers:
    """Every layer resized by ``scale`` (the picture is for eyes, not measurements)."""
    if scale == 1.0:
        return layers
    pixels = layers.pixels
    size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))

    def picture(a: np.ndarray | None, interpolation: int) -> np.ndarray | None:
        return None if a is None else cv2.resize(a, size, interpolation=interpolation)

    def boxed(b: list[int] | None) -> list[int] | None:
        return None if b is None else [round(v * scale) for v in b]

    return Layers(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR),
                  picture(layers.mask, cv2.INTER_NEAREST), boxed(layers.box), boxed(layers.local_box),
                  boxed(layers.region), picture(layers.cam, cv2.INTER_LINEAR), picture(layers.heart, cv2.INTER_NEAREST))


def _drawn_film(layers: Layers, fallback: bool, muted: bool, ctr_lines: list[list[int]]) -> np.ndarray:
    """The film in BGR with the heat map, the lung and heart outlines, the boxes and the CTR's widths."""
    height, width = layers.pixels.shape
    film = cv2.cvtColor(to_uint8(layers.pixels), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(min(height, width) / 400))
    if layers.cam is not None:
        film = heat_blend(film, layers.cam, alpha=MUTED_ALPHA if muted else 0.45)
    _outline(film, layers.mask, LUNG_BGR, thickness)
    if layers.box is not None:
        x0, y0, x1, y1 = layers.box
        if fallback:
            _dashed_rectangle(film, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, thickness + 1)
        else:
            cv2.rectangle(film, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, thickness + 1, cv2.LINE_AA)
    if layers.local_box is not None:
        x0, y0, x1, y1 = layers.local_box
        cv2.rectangle(film, (x0, y0), (x1 - 1, y1 - 1), LOCAL_BGR, thickness + 1, cv2.LINE_AA)
    if layers.region is not None and layers.cam is not None:
        x0, y0, x1, y1 = layers.region
        _dashed_rectangle(film, (x0, y0), (x1 - 1, y1 - 1), REGION_BGR, thickness)
    _outline(film, layers.heart, HEART_BGR, thickness)
    if len(ctr_lines) == 2 and abs(ctr_lines[0][0] - ctr_lines[1][0]) < 12 * thickness:
        ctr_lines[0][0] = ctr_lines[1][0] + 12 * thickness   # keep the heart's width visible
    for (y, x0, x1), colour in zip(ctr_lines, (HEART_BGR, LUNG_BGR)):  # heart, thoracic width
        cv2.line(film, (x0, y), (x1, y), colour, thickness + 1, cv2.LINE_AA)
        for x in (x0, x1):
            cv2.line(film, (x, y - 6 * thickness), (x, y + 6 * thickness), colour, thickness + 1)
    return film


def _outline(film: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int], thickness: int) -> None:
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(film, contours, -1, colour, thickness, cv2.LINE_AA)


def _title(cam_label: str | None, probability: float | None, threshold: float | None, called: bool,
           why: str | None, cam: np.ndarray | None, fallback: bool, local: bool) -> str:
    """The picture's title: the crop, and the class of the map with its probability and call."""
    title = "lungs not found: whole image used" if fallback else "lung crop"
    if local:
        title += " | local branch (magenta)"
    if cam_label is None:
        return title
    # three significant digits: calibrated probabilities of rare findings are small (0.007 < 0.014)
    verdict = "" if probability is None else f" p = {probability:.3g}" + (
        "" if threshold is None else f" {'>=' if called else '<'} {threshold:.3g}, {'called' if called else 'not called'}")
    return (f"Grad-CAM: {cam_label}{verdict}" + (f" ({why})" if why else "")
            + (" - no region raises this score" if cam is not None and not cam.any() else "") + f" | {title}")


def _framed(film: np.ndarray, title: str, caption: str | None, with_bar: bool) -> np.ndarray:
    """The film on a dark canvas: the wrapped title above, the caption below, the colour bar right."""
    height, width = film.shape[:2]
    text_scale = max(0.45, min(0.6, width / 1400))
    line_height = int(30 * text_scale / 0.6)
    total_width = width + (70 if with_bar else 0)
    titles = wrap_text(title, total_width - 16, text_scale)
    lines = wrap_text(caption or "", total_width - 16, text_scale) if caption else []
    top, bottom = line_height * len(titles) + 8, line_height * len(lines) + (10 if lines else 0)
    canvas = np.full((top + height + bottom, total_width, 3), 24, np.uint8)
    canvas[top:top + height, :width] = film
    for i, line in enumerate(titles):
        cv2.putText(canvas, line, (8, line_height * (i + 1) - 6), FONT, text_scale, TEXT_BGR, 1, cv2.LINE_AA)
    for i, line in enumerate(lines):
        cv2.putText(canvas, line, (8, top + height + line_height * (i + 1) - 4), FONT, text_scale, TEXT_BGR, 1,
                    cv2.LINE_AA)
    if with_bar:  # colour bar: 1 at the top, 0 at the bottom
        ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(16, axis=1)
        canvas[top:top + height, width + 8:width + 24] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
        for value in (0.0, 0.5, 1.0):
            y = top + int(round((1 - value) * (height - 1)))
            cv2.putText(canvas, f"{value:.1f}", (width + 28, min(max(y + 5, top + 12), top + height - 2)), FONT,
                        text_scale * 0.8, TEXT_BGR, 1, cv2.LINE_AA)
    return canvas


def ctr_caption(measurements: Measurements) -> str:
    """The cardiothoracic ratio in words, or why there is none."""
    value = measurements.ratio.value
    if value is None:
        return f"Cardiothoracic ratio: not measured ({measurements.ratio.reason})"
    above = measurements.above_cutoff
    verdict = ("" if above is None else
               f" ({'above' if above else 'not above'} the PA cut-off 0.50)")
    return f"Cardiothoracic ratio (heart width in red / thoracic width in green): {value:.2f}{verdict}"


def picture_for(result: Prediction, max_side: int = 1024, only: str | None = None) -> np.ndarray:
    """:func:`prediction_picture` of a :class:`~pneumoscan.prediction.Prediction` kept with its
    arrays (``keep_arrays=True``), captioned with its findings or its refusal: one panel per
    Grad-CAM explanation, side by side (the first, ``cam_label``, leftmost), or only the panel of
    ``only`` (default: the panels of the labels ``--cam LABEL[,LABEL…]`` asked for, if any); a film
    without a map gets one panel without."""
    if result.pixels is None:
        raise ValueError("a picture needs the prediction's arrays: predict with keep_arrays=True")
    maps = result.cam_maps or {}
    asked = [label for label, e in (result.cams or {}).items() if e.why == "asked for" and label in maps]
    labels: list[str | None] = [only] if only in maps else [*asked] or [*maps] or [None]
    if len(labels) > 1:
        max_side = min(max_side, 768)  # two or three panels side by side stay a readable width
    panels = []
    for label in labels:
        explanation = (result.cams or {}).get(label) if label else None
        panels.append(prediction_picture(
            result.pixels, result.mask, result.box, bool(result.fallback), maps.get(label) if label else None, label,
            (result.probabilities or {}).get(label) if label else None, max_side=max_side,
            caption=findings_caption(result), local_box=result.local_box,
            threshold=(result.thresholds or {}).get(label) if label else None,
            region=explanation.region if explanation else None, heart=result.heart,
            measurements=result.measurements,
            why=None if explanation is None or explanation.why == "called" else explanation.why))
    return side_by_side(panels)


def side_by_side(panels: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """BGR pictures in one row, padded at the bottom to the tallest."""
    if len(panels) == 1:
        return panels[0]
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0)), constant_values=24) for p in panels]
    return np.concatenate(padded, axis=1)[:, :-gap]


def save_png(picture: np.ndarray, path: str) -> None:
    """A BGR picture as a PNG file; OSError when it cannot be written."""
    ok, data = cv2.imencode(".png", picture)
    if not ok:
        raise OSError(f"could not encode the overlay for {path}")
    from pneumoscan.modelfile import atomic_write_bytes

    atomic_write_bytes(Path(path), data.tobytes(), sync=False)  # never a truncated picture under its name
