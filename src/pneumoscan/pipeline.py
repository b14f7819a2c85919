"""The one read → segment → crop path that predict, prepare, segment and evaluate all run: decoding
on threads ahead of the lung U-Net, which runs in batches, and each film's classifier crop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from pneumoscan.crop import classifier_crop, lungs_only
from pneumoscan.films import XrayReadError, read_xray


def segment_and_crop(images: list[np.ndarray], segmenter, size: int, batch: int = 16,
                     prepared: np.ndarray | None = None, masked: bool = False) -> tuple[list, np.ndarray]:
    """Segment [0, 1] grey pictures in batches and cut each one's classifier crop: the one
    segment → crop path behind ``predict``, ``prepare`` and ``evaluate``. ``prepared``: the
    U-Net inputs if already computed; ``masked``: black out everything outside the lung mask
    (:func:`pneumoscan.crop.lungs_only`) before cropping. Returns the segmentations and N×size×size uint8 crops."""
    segs = []
    for start in range(0, len(images), batch):
        segs.extend(segmenter.segment_batch(images[start:start + batch], None if prepared is None
                                            else prepared[start:start + batch]))
    crops = np.zeros((len(images), size, size), np.uint8)
    for i, (pixels, seg) in enumerate(zip(images, segs)):
        crops[i] = classifier_crop(lungs_only(pixels, seg.mask) if masked else pixels, seg.box, size)
    return segs, crops


@dataclass
class Cropped:
    """One input on the read → segment → crop path: the image (None if unreadable, with ``error``
    saying why), its segmentation and its uint8 classifier crop."""

    source: Any
    image: Any = None            # pneumoscan.films.XrayImage
    error: str | None = None
    prepared: np.ndarray | None = None  # the U-Nets' input, made on the decoding thread
    seg: Any = None              # pneumoscan.segment.Segmentation
    crop: np.ndarray | None = None


def read_segment_crop(sources: Iterable[Any], segmenter, size: int, *, batch: int = 16, threads: int = 2,
                      read: Callable[[Any], Any] | None = None, masked: bool = False) -> Iterator[list[Cropped]]:
    """The one read → segment → crop path (predict, prepare, segment, evaluate): decoding runs on
    ``threads`` threads ahead of the U-Net, which runs in batches of ``batch``; yields each batch
    in input order. ``read`` turns a source into an XrayImage (default: ``read_xray``) and may
    raise XrayReadError, which becomes the item's ``error``; ``masked`` as :func:`segment_and_crop`."""
    from pneumoscan.films import read_ahead

    read = read or read_xray

    def load(source: Any) -> Cropped:  # runs on a decoding thread: OpenCV releases the GIL
        try:
            image = read(source)
        except XrayReadError as exc:
            return Cropped(source, error=str(exc))
        return Cropped(source, image=image, prepared=segmenter.preprocessing(image.pixels))

    loaded = read_ahead(load, sources, threads=threads, ahead=2 * batch)
    while chunk := list(islice(loaded, batch)):
        readable = [c for c in chunk if c.image is not None]
        segs, crops = segment_and_crop([c.image.pixels for c in readable], segmenter, size, batch,
                                       np.stack([c.prepared for c in readable if c.prepared is not None]) if readable else None,
                                       masked=masked)
        for item, seg, crop in zip(readable, segs, crops):
            item.seg, item.crop = seg, crop
        yield chunk
