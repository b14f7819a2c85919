"""A reader study's ratings (readers × treatments × cases, and each case's truth), read from and
written to the formats statisticians use: a ratings CSV, the Iowa program's ``.lrc`` and iMRMC's
``.imrmc`` (told apart by content), each refused in one line when it cannot be analysed."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.errors import PneumoScanError


class RatingsError(PneumoScanError, ValueError):
    """A ratings file that cannot be analysed; the message says why."""


#: Leaving one case out must leave an AUC: at least this many cases of each truth.
MIN_CASES_PER_CLASS = 2


def _truth_value(value: str | float, case: str) -> int:
    """A case's truth, 0 or 1 (written as a number), or a refusal that names the case."""
    try:
        number = float(value)
    except ValueError:
        raise RatingsError(f"case {case!r}: truth {value!r} is not 0 or 1") from None
    if number not in (0.0, 1.0):
        raise RatingsError(f"case {case!r}: truth {value!r} is not 0 or 1")
    return int(number)


def _score_value(value: str | float, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise RatingsError(f"{where}: score {value!r} is not a number") from None
    if not np.isfinite(number):
        raise RatingsError(f"{where}: score {value!r} is not a finite number")
    return number


@dataclass
class Ratings:
    """``scores[t, r, c]``: treatment t's rating by reader r of case c (higher = more likely
    abnormal); ``truth[c]`` 0 / 1; the names of treatments, readers and cases."""

    scores: np.ndarray
    truth: np.ndarray
    treatments: list[str]
    readers: list[str]
    cases: list[str]
    title: str = ""

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, float)
        self.truth = np.asarray(self.truth, int)
        t, r, c = self.scores.shape
        if (t, r, c) != (len(self.treatments), len(self.readers), len(self.cases)) or len(self.truth) != c:
            raise RatingsError("scores, truth and names disagree in size")
        if t < 2 or r < 2:
            raise RatingsError(f"an MRMC analysis needs at least 2 treatments and 2 readers (got {t} and {r})")
        if not set(np.unique(self.truth)) == {0, 1}:
            raise RatingsError("the cases must include both normal (truth 0) and abnormal (truth 1) ones")
        few = {name: int((self.truth == k).sum()) for k, name in ((0, "normal"), (1, "abnormal"))}
        if min(few.values()) < MIN_CASES_PER_CLASS:
            raise RatingsError(f"too few cases to analyse: {few['normal']} normal and {few['abnormal']} abnormal "
                               f"(the jackknife needs at least {MIN_CASES_PER_CLASS} of each)")
        if not np.isfinite(self.scores).all():
            raise RatingsError("every reader must rate every case under every treatment (a fully crossed design)")


# --- reading and writing the three formats --------------------------------------------------------

def read_ratings(path: str | Path) -> Ratings:
    """A ratings CSV (columns reader, case, treatment, score, truth), an Iowa ``.lrc`` or an iMRMC
    ``.imrmc`` file, told apart by their content."""
    text = Path(path).read_text(errors="replace")
    try:
        if "BEGIN DATA:" in text:
            return _read_imrmc(text)
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        if {"reader", "case", "treatment", "score"} <= {h.strip().lower() for h in first.split(",")}:
            return _read_csv(text)
        if "*" in text and "#" in text:
            return _read_lrc(text)
    except (IndexError, KeyError, TypeError) as exc:  # a file cut short or of another layout
        raise RatingsError(f"{path}: not a readable ratings file (it ends or breaks where a rating was expected: "
                           f"{type(exc).__name__})") from None
    raise RatingsError(f"{path}: not a ratings CSV (reader, case, treatment, score, truth), an Iowa .lrc "
                       f"or an iMRMC .imrmc file")


def _assemble(rows: list[tuple[str, str, str, float]], truth: dict[str, int], title: str) -> Ratings:
    """The dense array of a fully crossed design; everything that would make it wrong (a case
    without truth, a cell rated twice, a cell missing) is refused before it is allocated, so a
    small file cannot ask for gigabytes."""
    treatments = list(dict.fromkeys(t for _, _, t, _ in rows))
    readers = list(dict.fromkeys(r for r, _, _, _ in rows))
    cases = list(truth)
    seen: set[tuple[str, str, str]] = set()
    for reader, case, treatment, _ in rows:
        if case not in truth:
            raise RatingsError(f"case {case!r} is rated but has no truth")
        if (reader, case, treatment) in seen:
            raise RatingsError(f"reader {reader!r} rated case {case!r} twice under {treatment!r}: one rating per "
                               f"reader, case and treatment (a correction replaces, it is not a second row)")
        seen.add((reader, case, treatment))
    if len(rows) != len(treatments) * len(readers) * len(cases):
        raise RatingsError(f"every reader must rate every case under every treatment (a fully crossed design): "
                           f"{len(rows):,} ratings for {len(treatments)} treatments × {len(readers)} readers × "
                           f"{len(cases)} cases")
    index = {c: k for k, c in enumerate(cases)}
    t_index, r_index = {t: k for k, t in enumerate(treatments)}, {r: k for k, r in enumerate(readers)}
    scores = np.full((len(treatments), len(readers), len(cases)), np.nan)
    for reader, case, treatment, score in rows:
        scores[t_index[treatment], r_index[reader], index[case]] = score
    return Ratings(scores, np.array([truth[c] for c in cases]), treatments, readers, cases, title)


def _read_imrmc(text: str) -> Ratings:
    head, _, body = text.partition("BEGIN DATA:")
    title = head.strip().splitlines()[0] if head.strip() else ""
    rows, truth = [], {}
    for line in body.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            raise RatingsError(f"iMRMC data line {line!r}: expected reader,case,modality,score")
        reader, case, modality, value = parts
        if reader == "-1" and modality.lower() == "truth":
            truth[case] = _truth_value(value, case)
        else:
            rows.append((reader, case, modality, _score_value(value, f"reader {reader!r}, case {case!r}")))
    return _assemble(rows, truth, title)


def _read_csv(text: str) -> Ratings:
    rows: list[tuple[str, str, str, float]] = []
    truth: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(text)):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items()}
        rows.append((row["reader"], row["case"], row["treatment"],
                     _score_value(row["score"], f"reader {row['reader']!r}, case {row['case']!r}")))
        if row.get("truth", "") != "":
            value = _truth_value(row["truth"], row["case"])
            if truth.setdefault(row["case"], value) != value:
                raise RatingsError(f"case {row['case']!r} has two truths")
    return _assemble(rows, truth, "")


def _read_lrc(text: str) -> Ratings:
    """Iowa LABMRMC format: a title, then per reader its name, (the first time) the treatment names
    and their rating directions, the normal cases' rows (one column per treatment), ``*``, the
    abnormal cases' rows, ``*``; ``#`` ends the file."""
    lines = [line.rstrip() for line in text.splitlines()]
    title, k = lines[0].strip(), 1
    treatments: list[str] = []
    rows: list[tuple[str, str, str, float]] = []
    truth: dict[str, int] = {}
    while k < len(lines) and lines[k].strip() != "#":
        reader = lines[k].strip()
        k += 1
        if not treatments:
            treatments = [name.strip('"') for name in lines[k].split()]
            directions = lines[k + 1].split()
            if any(d.upper() != "L" for d in directions):
                raise RatingsError("only .lrc files whose larger ratings mean abnormal ('L') are read")
            k += 2
        for label in (0, 1):
            n = 0
            while lines[k].strip() != "*":
                values = lines[k].split()[:len(treatments)]
                case = f"{'abnormal' if label else 'normal'} {n + 1}"
                truth[case] = label
                rows += [(reader, case, t, _score_value(v, f"reader {reader!r}, {case}")) for t, v in zip(treatments, values)]
                n, k = n + 1, k + 1
            k += 1
    return _assemble(rows, truth, title)


def write_imrmc(ratings: Ratings, path: str | Path) -> None:
    """The iMRMC input format (FDA's iMRMC program and its R package)."""
    lines = [ratings.title or "PneumoScan reader study", f"N0:{int((ratings.truth == 0).sum())}",
             f"N1:{int((ratings.truth == 1).sum())}", f"NR:{len(ratings.readers)}", f"NM:{len(ratings.treatments)}",
             "BEGIN DATA:"]
    lines += [f"-1,{case},truth,{label}" for case, label in zip(ratings.cases, ratings.truth)]
    for t, treatment in enumerate(ratings.treatments):
        for r, reader in enumerate(ratings.readers):
            lines += [f"{reader},{case},{treatment},{score:.6f}" for case, score in zip(ratings.cases, ratings.scores[t, r])]
    Path(path).write_text("\n".join(lines) + "\n")


def write_lrc(ratings: Ratings, path: str | Path) -> None:
    """The Iowa OR-DBM MRMC program's .lrc format (larger ratings = abnormal)."""
    lines = [ratings.title or "PneumoScan reader study"]
    for r, reader in enumerate(ratings.readers):
        lines.append(reader)
        if r == 0:
            lines += ["   ".join(f'"{t}"' for t in ratings.treatments), "   ".join("L" for _ in ratings.treatments)]
        for label in (0, 1):
            for c in np.flatnonzero(ratings.truth == label):
                lines.append("   ".join(f"{ratings.scores[t, r, c]:.6f}" for t in range(len(ratings.treatments))))
            lines.append("*")
    lines.append("#")
    Path(path).write_text("\n".join(lines) + "\n")


# --- AUCs and their covariances ---------------------------------------------------------------
