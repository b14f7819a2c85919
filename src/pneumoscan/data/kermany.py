"""Kermany paediatric pneumonia: ``{train,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (view not recorded).

PNEUMONIA → Pneumonia = 1, No Finding = 0, other findings unknown; NORMAL → No Finding = 1 and
all 14 findings 0. The patient key comes from the file name: ``person###`` (pneumonia) or
``IM-####`` / ``NORMAL2-IM-####`` (normal). The two name spaces cannot be linked, so a child with
both a normal and a pneumonia film counts as two patients (nothing in the release says otherwise).
"""

from __future__ import annotations

import re

from pneumoscan.data.base import IMAGE_SUFFIXES, XraySource, normal, only, row

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def patient_key(file_name: str) -> str:
    """``person1000_bacteria_2931.jpeg`` → ``person1000``; ``NORMAL2-IM-0381-0001`` →
    ``NORMAL2-IM-0381``; anything else keys on its own stem (one image, one patient)."""
    for pattern in (_PERSON, _IM):
        match = pattern.match(file_name)
        if match:
            return match.group(1)
    return file_name.rsplit(".", 1)[0]


class Kermany(XraySource):
    name = "kermany"
    population = "paediatric"

    def _rows(self):
        splits = [s for s in ("train", "test", "val") if (self.root / s).is_dir()]
        if not splits:
            self._require("train", "test")
        for split in splits:
            for klass, labels in (("NORMAL", normal()), ("PNEUMONIA", only(Pneumonia=1, No_Finding=0))):
                folder = self.root / split / klass
                if not folder.is_dir():
                    self.warnings.append(f"kermany: no folder {split}/{klass}")
                    continue
                for path in folder.iterdir():
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        # Kermany's tiny official "val" (16 images) is part of its training data.
                        official = "test" if split == "test" else "train"
                        yield row(path, patient_key(path.name), None, labels, official_split=official)
