"""The one read → segment → crop path that predict, prepare, segment and evaluate all run: decoding
on threads ahead of the lung U-Net, which runs in batches, and each film's classifier crop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoscan.crop import classifier_crop, lungs_only
from pneumoscan.films import XrayImage, XrayReadError, read_xray

if TYPE_CHECKING:
    from pneumoscan.segment import Segmentation


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


@dataclass(frozen=True)
class Segmented:
    """A readable film after the lung U-Net: what the stages after it read, nothing missing."""

    source: Any
    image: XrayImage
    prepared: np.ndarray  # the U-Nets' input
    seg: Segmentation
    crop: np.ndarray      # the classifier's uint8 crop


@dataclass
class Cropped:
    """One input on the read → segment → crop path, filled in as it goes: the image (None if
    unreadable, with ``error`` saying why), its segmentation and its uint8 classifier crop."""

    source: Any
    image: XrayImage | None = None
    error: str | None = None
    prepared: np.ndarray | None = None  # the U-Nets' input, made on the decoding thread
    seg: Segmentation | None = None
    crop: np.ndarray | None = None

    def segmented(self) -> Segmented | None:
        """The film as the stages after the U-Net read it; None when it could not be read."""
        if self.image is None or self.prepared is None or self.seg is None or self.crop is None:
            return None
        return Segmented(self.source, self.image, self.prepared, self.seg, self.crop)


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
        readable = [(c, c.image, c.prepared) for c in chunk if c.image is not None and c.prepared is not None]
        segs, crops = segment_and_crop([image.pixels for _, image, _ in readable], segmenter, size, batch,
                                       np.stack([prepared for _, _, prepared in readable]) if readable else None,
                                       masked=masked)
        for (item, _, _), seg, crop in zip(readable, segs, crops):
            item.seg, item.crop = seg, crop
        yield chunk
