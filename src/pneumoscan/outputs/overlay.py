"""Pictures for people: the X-ray with its lung contour and crop box drawn on it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pneumoscan.enhance import to_uint8

LUNG_BGR = (80, 220, 80)
BOX_BGR = (40, 170, 255)
LOCAL_BGR = (255, 60, 255)
REGION_BGR = (255, 255, 0)
HEART_BGR = (60, 60, 255)
#: A heat map of a class below its threshold is drawn this faintly: it draws the eye less.
MUTED_ALPHA = 0.18


def segmentation_overlay(pixels: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int],
                         fallback: bool, heart: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 image: grey X-ray, lung contour in green, heart contour in red (if given), crop
    box in orange (dashed if the whole image is used because the lungs were not found)."""
    canvas = cv2.cvtColor(to_uint8(pixels), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(min(pixels.shape) / 256))
    for outline, colour in ((mask, LUNG_BGR), (heart, HEART_BGR)):
        if outline is not None:
            contours, _ = cv2.findContours(outline.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvas, contours, -1, colour, thickness, cv2.LINE_AA)
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


def prediction_picture(pixels: np.ndarray, mask: np.ndarray | None, box: list[int] | None, fallback: bool,
                       cam: np.ndarray | None, cam_label: str | None, probability: float | None,
                       max_side: int = 1024, caption: str | None = None,
                       local_box: list[int] | None = None, threshold: float | None = None,
                       region: list[int] | None = None, heart: np.ndarray | None = None,
                       measurements: dict | None = None) -> np.ndarray:
    """BGR uint8 picture for people: the X-ray (at most ``max_side``) with lung contour, crop box
    (dashed when the whole image was used), an AG-CNN model's local box (what its local branch
    read, in magenta) and, if given, the Grad-CAM heat map with a colour bar and its region
    outlined in cyan; the heart outline and width in red, the thoracic width in green
    (``measurements``, :mod:`pneumoscan.measure`); the title says the class, its probability against
    its ``threshold`` and whether it was called (a map of a class not called is drawn muted);
    ``caption`` (findings, labels not assessed, the ratio) below. OpenCV only: about 10 ms, where the same figure in matplotlib took
    0.44 s."""
    scale = min(1.0, max_side / max(pixels.shape))
    if scale < 1.0:  # draw at most max_side pixels: the picture is for eyes, not measurements
        size = (round(pixels.shape[1] * scale), round(pixels.shape[0] * scale))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        mask = None if mask is None else cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        cam = None if cam is None else cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR)
        box = None if box is None else [round(v * scale) for v in box]
        local_box = None if local_box is None else [round(v * scale) for v in local_box]
        region = None if region is None else [round(v * scale) for v in region]
        heart = None if heart is None else cv2.resize(heart, size, interpolation=cv2.INTER_NEAREST)
    lines_of_ctr = [[round(v * scale) for v in line] for line in
                    ((measurements or {}).get("heart_line"), (measurements or {}).get("thoracic_line"))
                    if line] if (measurements or {}).get("cardiothoracic_ratio") is not None else []
    height, width = pixels.shape
    film = cv2.cvtColor(to_uint8(pixels), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(min(height, width) / 400))
    called = probability is not None and threshold is not None and probability >= threshold
    muted = probability is not None and threshold is not None and not called
    if cam is not None:
        film = heat_blend(film, cam, alpha=MUTED_ALPHA if muted else 0.45)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(film, contours, -1, LUNG_BGR, thickness, cv2.LINE_AA)
    if box is not None:
        x0, y0, x1, y1 = box
        if fallback:
            _dashed_rectangle(film, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, thickness + 1)
        else:
            cv2.rectangle(film, (x0, y0), (x1 - 1, y1 - 1), BOX_BGR, thickness + 1, cv2.LINE_AA)
    if local_box is not None:
        x0, y0, x1, y1 = local_box
        cv2.rectangle(film, (x0, y0), (x1 - 1, y1 - 1), LOCAL_BGR, thickness + 1, cv2.LINE_AA)
    if region is not None and cam is not None:
        x0, y0, x1, y1 = region
        _dashed_rectangle(film, (x0, y0), (x1 - 1, y1 - 1), REGION_BGR, thickness)
    if heart is not None and heart.any():
        contours, _ = cv2.findContours(heart.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(film, contours, -1, HEART_BGR, thickness, cv2.LINE_AA)
    if len(lines_of_ctr) == 2 and abs(lines_of_ctr[0][0] - lines_of_ctr[1][0]) < 12 * thickness:
        lines_of_ctr[0][0] = lines_of_ctr[1][0] + 12 * thickness   # keep the heart's width visible
    for (y, x0, x1), colour in zip(lines_of_ctr, (HEART_BGR, LUNG_BGR)):  # heart, thoracic width
        cv2.line(film, (x0, y), (x1, y), colour, thickness + 1, cv2.LINE_AA)
        for x in (x0, x1):
            cv2.line(film, (x, y - 6 * thickness), (x, y + 6 * thickness), colour, thickness + 1)
    text_scale = max(0.4, min(0.6, width / 1400))
    line_height = int(30 * text_scale / 0.6)
    bar_width = 70 if cam is not None else 0
    total_width = width + bar_width
    title = "lungs not found: whole image used" if fallback else "lung crop"
    if local_box is not None:
        title += " | local branch (magenta)"
    if cam_label is not None:
        # three significant digits: calibrated probabilities of rare findings are small (0.007 < 0.014)
        verdict = "" if probability is None else f" p = {probability:.3g}" + (
            "" if threshold is None else f" {'>=' if called else '<'} {threshold:.3g}, {'called' if called else 'not called'}")
        title = f"Grad-CAM: {cam_label}{verdict}" + \
            (" - no region raises this score" if cam is not None and not cam.any() else "") + f" | {title}"
    if measurements is not None:
        caption = (caption + "\n" if caption else "") + ctr_caption(measurements)
    if cam is not None:
        caption = (caption + "\n" if caption else "") + ("Colour bar: Grad-CAM relative to this map's maximum "
                                                         "(not a probability); cyan: where it reaches half of it")
    lines = wrap_text(caption or "", total_width - 16, text_scale) if caption else []
    top, bottom = line_height + 8, line_height * len(lines) + (10 if lines else 0)
    canvas = np.full((top + height + bottom, total_width, 3), 24, np.uint8)
    canvas[top:top + height, :width] = film
    cv2.putText(canvas, title, (8, top - 10), FONT, text_scale, TEXT_BGR, 1, cv2.LINE_AA)
    for i, line in enumerate(lines):
        cv2.putText(canvas, line, (8, top + height + line_height * (i + 1) - 4), FONT, text_scale, TEXT_BGR, 1,
                    cv2.LINE_AA)
    if cam is not None:  # colour bar: 1 at the top, 0 at the bottom
        ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(16, axis=1)
        canvas[top:top + height, width + 8:width + 24] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
        for value in (0.0, 0.5, 1.0):
            y = top + int(round((1 - value) * (height - 1)))
            cv2.putText(canvas, f"{value:.1f}", (width + 28, min(max(y + 5, top + 12), top + height - 2)), FONT,
                        text_scale * 0.8, TEXT_BGR, 1, cv2.LINE_AA)
    return canvas


def ctr_caption(measurements: dict) -> str:
    """The cardiothoracic ratio in words, or why there is none."""
    value = measurements.get("cardiothoracic_ratio")
    if value is None:
        return f"Cardiothoracic ratio: not measured ({measurements.get('cardiothoracic_ratio_reason')})"
    above = measurements.get("ctr_above_pa_cutoff")
    verdict = ("" if above is None else
               f" ({'above' if above else 'not above'} the PA cut-off 0.50)")
    return f"Cardiothoracic ratio (heart width in red / thoracic width in green): {value:.2f}{verdict}"


def picture_for(result, max_side: int = 1024) -> np.ndarray:
    """:func:`prediction_picture` of a :class:`~pneumoscan.predict.Prediction` kept with its
    arrays (``keep_arrays=True``), captioned with its findings or its refusal."""
    probability = (result.probabilities or {}).get(result.cam_label) if result.cam_label else None
    threshold = (result.thresholds or {}).get(result.cam_label) if result.cam_label else None
    return prediction_picture(result.pixels, result.mask, result.box, result.fallback, result.cam, result.cam_label,
                              probability, max_side=max_side, caption=findings_caption(result),
                              local_box=result.local_box, threshold=threshold, region=result.cam_region,
                              heart=result.heart, measurements=result.measurements)


def save_png(picture: np.ndarray, path: str) -> None:
    """A BGR picture as a PNG file; OSError when it cannot be written."""
    ok, data = cv2.imencode(".png", picture)
    if not ok:
        raise OSError(f"could not encode the overlay for {path}")
    from pneumoscan.modelfile import atomic_write_bytes

    atomic_write_bytes(Path(path), data.tobytes(), sync=False)  # never a truncated picture under its name
