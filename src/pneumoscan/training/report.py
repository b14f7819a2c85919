"""The evaluation's report files: ``report.json``, ``report.md`` (and ``report.html``, the same with
its plots), ``roc.png``, ``reliability.png``, ``reliability_calibrated.png`` and ``scores.csv``.
The headline is always an AUC measured inside one data source, beside the published ChestX-ray14
figures with the split each used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.labels import LABELS
from pneumoscan.training.metrics import known_pairs, roc_auc
from pneumoscan.training.tables import MIN_CELL

#: Mean AUC over the 14 ChestX-ray14 findings as published (SPEC stage 8), with the split each
#: paper describes. None of them is comparable with a small development set.
PUBLISHED = [
    ("Wang et al. 2017 (ChestX-ray8)", 0.738, "NIH ChestX-ray14, random image split 70/10/20 (as the paper describes)"),
    ("Yao et al. 2017", 0.803, "NIH ChestX-ray14, random split (as the paper describes)"),
    ("Kumar et al. 2018", 0.795, "NIH ChestX-ray14, random split (as the paper describes)"),
    ("Rajpurkar et al. 2017 (CheXNet)", 0.842, "NIH ChestX-ray14, patient-wise random split, no patient overlap"),
    ("Thesis (Jadavpur 2019)", 0.810, "NIH ChestX-ray14; the thesis does not state its split"),
]


def fmt3(value: float | None) -> str:
    """A figure for a report table: three decimals, "–" when there is none."""
    return "–" if value is None else f"{value:.3f}"


def write_report(report: dict[str, Any], labels: np.ndarray, probs: np.ndarray, out: str | Path,
                 model_meta: dict[str, Any] | None = None) -> None:
    """``report.json``, ``report.md``, ``roc.png`` and ``reliability.png`` in ``out`` (with the
    operating points and subgroups when the report has them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plot_roc(labels, probs, out / "roc.png",
              [label for label in LABELS if report["per_label"][label]["threshold"] is not None])
    _plot_reliability({label: (report["calibration"][label], f"ECE {report['per_label'][label]['ece']:.2f}")
                       for label in LABELS if report["calibration"][label] and report["auc"][label] is not None},
                      out / "reliability.png", "predicted probability", "Reliability")
    if report.get("calibration_after"):
        _plot_reliability({label: (e["bins"], f"ECE {fmt3(e['calibrated']['ece'])}, raw {fmt3(e['raw']['ece'])}")
                           for label, e in report["calibration_after"].items()},
                          out / "reliability_calibrated.png", "calibrated probability", "Reliability, calibrated")
    assessment = (model_meta or {}).get("assessment") or {}
    lines = (_header_lines(report, model_meta, assessment) + _within_lines(report["within_source"], assessment)
             + _pooled_lines(report) + operating_point_lines(report.get("operating_points") or {})
             + subgroup_lines(report.get("subgroups") or []) + _published_lines(report) + calibration_lines(report))
    dropped = report.get("dropped") or []
    if dropped:
        lines += ["", f"## Films left out ({len(dropped)})", "", "| film | why |", "|---|---|"]
        lines += [f"| {d['path']} | {d['reason']} |" for d in dropped]
    (out / "report.md").write_text("\n".join(lines))


def _header_lines(report: dict[str, Any], model_meta: dict[str, Any] | None, assessment: dict[str, Any]) -> list[str]:
    """The title, how the intervals were drawn, and which model with which assessed labels."""
    lines = [f"# Evaluation on split `{report['split']}` ({report['n_images']} images)", ""]
    unit = report.get("ci_resamples")
    if unit:
        lines += [f"95 % CIs: percentile bootstrap, {unit['draws']} resamples of the split's "
                  f"{unit['count']:,} {unit['unit']}"
                  + (" (a patient's films drawn together)" if unit["unit"] == "patients" else "") + ".", ""]
    if model_meta:
        lines += [f"Model: weights SHA-256 `{model_meta.get('weights_sha256', '?')[:16]}…`, input "
                  f"{model_meta.get('input_size')} px, trained on "
                  f"{model_meta.get('training_data', {}).get('description', '?')}. Assessed labels: "
                  + (", ".join(lab for lab in LABELS if (assessment.get(lab) or {}).get("assessed")) or "none")
                  + ".", ""]
    return lines


def _within_lines(within: dict[str, Any], assessment: dict[str, Any]) -> list[str]:
    """The headline: each AUC inside one data source, and their mean over the assessed findings."""
    mean = within["mean_auc_findings"]
    lines = ["## Headline: AUC measured inside each data source", "",
             (f"Mean AUC over {_count(within['findings_scored'], 'assessed finding')} "
              f"({', '.join(within['findings_scored'])}; the other {14 - len(within['findings_scored'])} "
              f"are not averaged), each measured inside the sources that have at "
              f"least {within['min_per_class']} positives and negatives: **{mean:.3f}**."
              if mean is not None else
              f"No finding the model assesses has {within['min_per_class']} positives and negatives inside "
              f"one source of this split, so no mean AUC is reported (a pooled figure would measure the "
              f"data sets, and unassessed labels are never averaged)."),
             "", "| label | source | positives / negatives | AUC | 95 % CI | assessed by the model |",
             "|---|---|---|---|---|---|"]
    for label, entry in within["per_label"].items():
        flag = "yes" if (assessment.get(label) or {}).get("assessed") else "no"
        for source, v in entry["sources"].items():
            ci = v.get("ci") or [None, None]
            lines.append(f"| {label} | {source} | {v['positives']} / {v['negatives']} | {fmt3(v['auc'])} | "
                         f"{fmt3(ci[0])}–{fmt3(ci[1])} | {flag} |")
    return lines


def _pooled_lines(report: dict[str, Any]) -> list[str]:
    """The detail pooled over every source, with the warning where it measures the sources."""
    fmt = fmt3
    lines = ["", "## Detail: pooled over every source of the split", "",
             "Pooled AUCs mix data sets: where a label's positives and negatives come from different "
             "sources they reward telling the sources apart. They are not finding measures.", "",
             "| label | positives / known | pooled AUC | 95 % CI | threshold (raw) | sensitivity | specificity | ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for label in LABELS:
        pl, ci = report["per_label"][label], report["auc_ci"][label]
        lines.append(f"| {label} | {pl['positives']} / {pl['known']} | {fmt(report['auc'][label])} | "
                     f"{fmt(ci[0])}–{fmt(ci[1])} | "
                     f"{'not assessed' if pl['threshold'] is None else format(pl['threshold'], '.3f')} | "
                     f"{fmt(pl['sensitivity'])} | {fmt(pl['specificity'])} | {fmt(pl['ece'])} |")
    confounded = [label for label in LABELS
                  if (report["per_label"][label].get("negatives_from_sources_without_positives") or 0) > 0.5
                  and report["auc"][label] is not None]
    if confounded:
        lines += ["", "**Source warning.** For " + ", ".join(confounded) + ", more than half of the "
                  "negatives come from data sources that have no positive for that label, so the pooled "
                  "AUC above rewards telling the sources apart rather than finding the disease."]
    return lines


def _published_lines(report: dict[str, Any]) -> list[str]:
    """Published mean AUCs beside this model's (for orientation), and the thresholds' scale."""
    within = report["within_source"]
    lines = ["", "## Published mean AUCs on NIH ChestX-ray14 (for orientation, not comparable)", "",
             "| method | mean AUC (14 findings) | data and split |", "|---|---|---|"]
    lines += [f"| {name} | {auc:.3f} | {split} |" for name, auc, split in PUBLISHED]
    lines += [f"| this model | {fmt3(within['mean_auc_findings'])} | within-source mean over "
              f"{_count(within['findings_scored'], 'assessed finding')}, "
              f"split `{report['split']}` of the given manifest ({within['images']} images) |", "",
              f"Thresholds: {report.get('thresholds_from') or 'stored with the model'}; labels the model does not "
              "assess have none. They are on the raw score scale, as the scores here are; `predict`, the overlay "
              "and the pages print the same operating points on the calibrated scale (`calibrate`'s card and "
              "output show both).", ""]
    return lines


def calibration_lines(report: dict[str, Any]) -> list[str]:
    """report.md's calibration section: raw scores against the calibrated probabilities."""
    after = report.get("calibration_after") or {}
    if not after:
        return []
    named = report.get("calibrated_for") or {}
    lines = ["", "## Calibration: raw scores and the probabilities every output prints", "",
             f"Adult films are calibrated for: {named.get('adult') or 'nothing (raw scores)'}; paediatric films for: "
             f"{named.get('paediatric') or 'nothing (raw scores)'}. Measured here at these films' own prevalence, "
             "which differs from the named population's, so a calibrated ECE here need not be small "
             "(`reliability_calibrated.png`).", "",
             "| label | films (positives) | ECE raw | ECE calibrated | Brier raw | Brier calibrated |",
             "|---|---|---|---|---|---|"]
    for label, e in after.items():
        lines.append(f"| {label} | {e['films']} ({e['positives']}) | {fmt3(e['raw']['ece'])} | "
                     f"{fmt3(e['calibrated']['ece'])} | {e['raw']['brier']:.4f} | {e['calibrated']['brier']:.4f} |")
    return lines


def operating_point_lines(table: dict[str, list]) -> list[str]:
    """report.md's operating-point table."""
    if not table:
        return []
    lines = ["", "## Operating points on these films", "",
             ("Thresholds that reach each target here, and what they give; `pneumoscan calibrate` writes a "
              "model with one of them. Chosen on the films they are measured on: expect less on new films."), "",
             "| label | target | threshold | sensitivity | specificity |", "|---|---|---|---|---|"]
    for label, rows in table.items():
        lines += [f"| {label} | {r['target']} | {r['threshold']:.4f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} |"
                  for r in rows]
    return lines


def subgroup_lines(cells: list[dict[str, Any]]) -> list[str]:
    """report.md's subgroup table (each cell inside one source)."""
    if not cells:
        return []
    fmt = fmt3
    under = "underdiagnosed" in cells[0]
    lines = ["", "## Subgroups (inside each source)", "",
             (f"Cells marked * hold fewer than {MIN_CELL} positives or negatives: read them as noise. "
              + ("*Under-diagnosed*: the share of films with a labelled finding that the model calls "
                 "\"No Finding\"." if under else "")), "",
             ("| label | source | subgroup | films | pos / neg | AUC (95 % CI) | sensitivity | specificity | ECE |"
              + (" under-diagnosed (films) |" if under else "")),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if under else "")]
    for c in cells:
        ci = c["auc_ci"]
        auc = fmt(c["auc"]) + (f" ({fmt(ci[0])}–{fmt(ci[1])})" if None not in ci else "")
        row = (f"| {c['label']} | {c['source']} | {c['attribute']} {c['value']}{' *' if c['few'] else ''} | "
               f"{c['films']} | {c['positives']} / {c['negatives']} | {auc} | "
               f"{fmt(c['sensitivity'])} | {fmt(c['specificity'])} | {fmt(c['ece'])} |")
        if under:
            row += f" {fmt(c.get('underdiagnosed'))} ({c.get('films_with_a_finding', 0)}) |"
        lines.append(row)
    return lines


def html_report(markdown_path: Path) -> str:
    """report.html: report.md as a page, with the ROC and reliability plots beside it (the same
    numbers; tables from the Markdown, so the two cannot disagree)."""
    import html as escaping

    blocks: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if table:
            head, *body = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r) <= set("|-")]
            blocks.append("<table><tr>" + "".join(f"<th>{escaping.escape(c)}</th>" for c in head) + "</tr>"
                          + "".join("<tr>" + "".join(f"<td>{escaping.escape(c)}</td>" for c in r) + "</tr>"
                                    for r in body) + "</table>")
            table.clear()

    for line in markdown_path.read_text().splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            blocks.append(f"<h{level}>{escaping.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            blocks.append(f"<p>{escaping.escape(line).replace('**', '')}</p>")
    flush()
    blocks.insert(2, '<p><img src="roc.png" alt="ROC curves"> <img src="reliability.png" alt="reliability"></p>')
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>PneumoScan evaluation</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:1.5em;max-width:75em} table{border-collapse:collapse;"
            "margin:.5em 0} td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left} img{width:32em}"
            "</style></head><body>" + "\n".join(blocks) + "</body></html>\n")


def _count(items: Sequence[str], noun: str) -> str:
    """"1 assessed finding", "3 assessed findings"."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _plot_roc(labels: np.ndarray, probs: np.ndarray, path: Path, assessed: Sequence[str] | None = None) -> None:
    """ROC curves, one colour per label; labels the model does not assess are thin and dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(7, 7))
    colours = plt.get_cmap("tab20")(np.arange(20))  # 20 distinct colours: no two labels share one
    for j, label in enumerate(LABELS):
        y, p = known_pairs(labels[:, j], probs[:, j])
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            shown = assessed is None or label in assessed
            ax.plot(fpr, tpr, lw=2.0 if shown else 0.9, ls="-" if shown else ":", color=colours[j % 20],
                    label=f"{label} ({roc_auc(labels[:, j], probs[:, j]):.2f})" + ("" if shown else ", not assessed"))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC curves", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_reliability(curves: dict[str, tuple[list[dict[str, float]], str]], path: Path, xlabel: str,
                      title: str) -> None:
    """A reliability diagram: per label (name → (bins, legend text)) observed rate against the
    mean probability of each bin, and the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for label, (bins, legend) in curves.items():
        ax.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-", ms=3, lw=1,
                label=f"{label} ({legend})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel=xlabel, ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_scores(rows: Any, labels: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """``scores.csv``: one line per evaluated film, its manifest fields, each label's truth (empty
    where unknown) and probability; what a reader needs to recompute any figure. Text cells
    follow the predictions CSV's formula rule."""
    from pneumoscan.outputs.writer import spreadsheet_safe

    keep = [c for c in ("path", "source", "patient", "split", "sex", "age", "view") if c in rows]
    table = rows[keep].reset_index(drop=True).copy()
    for column in keep:  # a file named =HYPERLINK(…) stays a name in a spreadsheet (OWASP's rule)
        table[column] = table[column].map(spreadsheet_safe)  # numbers pass unchanged
    for j, label in enumerate(LABELS):
        table[f"y_{label}"] = labels[:, j]
        table[f"p_{label}"] = np.round(probs[:, j], 6)
    table.to_csv(path, index=False, float_format="%.6g")
