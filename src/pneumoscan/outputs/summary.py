"""What a folder of predictions adds up to: each film's status, the counts (``summary.json``) and
a triage sheet (``triage.html``) a person opens in a browser, most urgent first.

Built from ``predictions.jsonl`` or ``.csv`` after a run (so a resumed ``--ray`` run counts every
film in the file). Status of one film:

- ``called``: at least one assessed finding other than "No Finding" at or above its threshold;
- ``not called``: scored, and no such finding;
- ``refused``: the input gate said it is not a frontal chest X-ray (not scored);
- ``error``: it could not be read.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

from pneumoscan.labels import LABELS
from pneumoscan.reading import (
    GROUPS,
    STATUSES,
    VERDICTS,
    assessed_thresholds,
    status_of,
)


def light_rows(target: Path) -> list[dict[str, Any]]:
    """Per film of a predictions file: path, status, overlay, assessed probabilities and
    thresholds, findings, their explanations, unreliable masks, and the gate's or reader's reason."""
    from pneumoscan.outputs.writer import CSV_TAIL, explained, from_spreadsheet_safe

    rows = []
    if target.suffix == ".jsonl":
        for line in target.read_text().splitlines():
            record = json.loads(line)
            thresholds = assessed_thresholds(record)
            rows.append({"path": record["path"], "status": status_of(record), "overlay": record.get("overlay"),
                         "verdict": record.get("verdict"), "population": (record.get("population") or {}).get("group"),
                         "probabilities": {k: (record.get("probabilities") or {}).get(k) for k in thresholds},
                         "thresholds": thresholds, "findings": record.get("findings") or [],
                         "rank_scores": {k: v for k, v in (record.get("rank_scores") or {}).items() if v is not None},
                         "explanations": explained(record.get("cams")),
                         "masks": "; ".join((record.get("mask_quality") or {}).get("unreliable") or []),
                         "reason": record.get("error") or "; ".join((record.get("quality") or {}).get("reasons", []))})
        return rows
    with open(target, newline="") as handle:
        table = list(csv.reader(handle))
    for cells in table[1:]:
        cells = [from_spreadsheet_safe(c) for c in cells]
        tail = dict(zip(CSV_TAIL, cells[1 + len(LABELS):]))
        thresholds = json.loads(tail["thresholds"] or "{}")
        probs = {label: float(v) for label, v in zip(LABELS, cells[1:1 + len(LABELS)]) if v != ""}
        rows.append({"path": cells[0], "status": tail["status"], "overlay": tail["overlay"] or None,
                     "verdict": tail["verdict"] or None, "population": tail["population"] or None,
                     "probabilities": {k: probs.get(k) for k in thresholds}, "thresholds": thresholds,
                     "findings": [f for f in tail["findings"].split("|") if f],
                     "rank_scores": json.loads(tail["rank_scores"] or "{}"),
                     "explanations": tail["explanations"], "masks": tail["masks_unreliable"].replace("|", "; "),
                     "reason": tail["error"] or tail["gate_reasons"].replace("|", "; ")})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by status, and per assessed label how many films it was called on."""
    labels = sorted({label for row in rows for label in row["thresholds"]}, key=LABELS.index)
    return {"images": len(rows), "by_status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "by_verdict": {v: sum(r.get("verdict") == v for r in rows) for v in VERDICTS},
            "by_population": {g: sum(r.get("population") == g for r in rows) for g in GROUPS},
            "called_by_label": {label: sum(label in r["findings"] for r in rows) for label in labels},
            "assessed_labels": labels}


#: Triage order: abnormal films first, then those it cannot call either way, then normal ones;
#: refused and unreadable films (no verdict) last.
VERDICT_ORDER = {"abnormal": 0, "indeterminate": 1, "no finding called": 1, "normal": 2}


def urgency(row: dict[str, Any]) -> float:
    """The triage order inside a verdict (refused and unreadable films last): the highest rank
    score of an assessed finding other than "No Finding" (one scale for every population,
    :func:`pneumoscan.reading.rank_scores`); for records without rank scores (older model files),
    how far the most probable finding lies above its threshold."""
    ranks = [r for k, r in (row.get("rank_scores") or {}).items() if k != "No Finding" and r is not None]
    if ranks:
        return max(ranks)
    margins = [p - row["thresholds"][k] for k, p in row["probabilities"].items()
               if p is not None and k != "No Finding"]
    return max(margins) if margins else float("-inf")


def relative_url(name: str) -> str:
    """A file name beside the page as a link that can only be that file: percent-encoded (``:``
    too) behind ``./``, so a film named ``javascript:alert(1)//`` never becomes a script URL."""
    from urllib.parse import quote

    return html.escape("./" + quote(name, safe=""))


def triage_html(rows: list[dict[str, Any]], summary: dict[str, Any], title: str) -> str:
    """One row per film, most urgent first: the overlay's thumbnail (a link to it), each assessed
    probability against its threshold (bold when at or above), the status and why."""
    labels = summary["assessed_labels"]
    ordered = sorted(rows, key=lambda r: (VERDICT_ORDER.get(r.get("verdict") or "", len(VERDICT_ORDER)), -urgency(r)))
    counts = ", ".join(f"{n} {s}" for s, n in summary["by_status"].items())
    verdicts = ", ".join(f"{n} {v}" for v, n in summary.get("by_verdict", {}).items())
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for row in ordered:
        overlay = relative_url(row["overlay"]) if row["overlay"] else None
        picture = f'<a href="{overlay}"><img loading="lazy" src="{overlay}" alt=""></a>' if overlay else ""
        cells = []
        for label in labels:
            p, t = row["probabilities"].get(label), row["thresholds"].get(label)
            if p is None or t is None:
                cells.append("<td></td>")
                continue
            over = p >= t
            cells.append(f'<td class="{"over" if over else "under"}">{p:.3g}<small> / {t:.3g}</small></td>')
        notes = [row["reason"], row.get("masks"), row.get("explanations", "").replace("|", "; ")]
        reason = "".join(f'<div class="why">{html.escape(n)}</div>' for n in notes if n)
        body.append(f'<tr class="{row["status"].replace(" ", "-")}"><td class="pic">{picture}</td>'
                    f'<td class="name">{html.escape(Path(row["path"]).name)}{reason}</td>'
                    f'<td class="status">{row.get("verdict") or row["status"]}</td>'
                    f'<td class="population">{html.escape(row.get("population") or "")}</td>{"".join(cells)}</tr>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }}
th {{ position: sticky; top: 0; background: #fff; }}
img {{ width: 200px; display: block; }} td.over {{ font-weight: bold; color: #b00020; }} td.under {{ color: #555; }}
small {{ color: #888; font-weight: normal; }} tr.called td.status {{ color: #b00020; font-weight: bold; }}
tr.refused, tr.error {{ background: #f6f6f6; }} .why {{ color: #666; font-size: 12px; max-width: 28em; }}
td.name {{ max-width: 24em; overflow-wrap: anywhere; }} th {{ overflow-wrap: anywhere; }}
.note {{ color: #555; max-width: 60em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{summary["images"]} films: {counts}; {verdicts}. Abnormal films first, then those with no finding called
(indeterminate: neither a finding nor No Finding called), then normal, then refused and unreadable ones; inside
each, by the highest rank score of a finding (its percentile among the model's development films, one scale for
adults and children alike). Each cell is the calibrated probability / the threshold, bold at or
above it; a film is read as an adult's or a child's (its own assessed labels and thresholds), and labels not
assessed for it are empty.</p>
<p class="note">Research use only, not a diagnosis. A heat map shows where the score came from, not a lesion outline.
Under each film: why it was refused, which masks are not to be trusted, and what explains each called finding (a
Grad-CAM region in film pixels, or for Cardiomegaly the heart outline).</p>
<table><thead><tr><th>overlay</th><th>film</th><th>verdict</th><th>read as</th>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""


def write_summary(target: Path, out: Path) -> dict[str, Any]:
    """``summary.json`` and ``triage.html`` in ``out`` for the predictions in ``target``."""
    from pneumoscan.modelfile import atomic_write_bytes

    rows = light_rows(target)
    summary = summarise(rows)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode(), sync=False)
    atomic_write_bytes(out / "triage.html", triage_html(rows, summary, f"PneumoScan triage: {out.name}").encode(),
                       sync=False)
    return summary
