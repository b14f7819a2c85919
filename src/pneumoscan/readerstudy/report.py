"""The reader study's report: ``study.md`` (every table of :func:`pneumoscan.readerstudy.mrmc.analyse`, in the
order the Iowa OR-DBM MRMC program prints them, so a statistician can check it line by line) and
``study.html`` (the same with each reader's empirical ROC curve per treatment)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np


def _f(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def _ci(pair: list[float]) -> str:
    return f"{pair[0]:.4f} to {pair[1]:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _pairs(pairs: list[dict[str, Any]], statistic: str, by_reader: bool = False) -> list[str]:
    """A table of treatment differences: difference, std. error, (df,) t or z, p, CI."""
    with_df = "df" in pairs[0] if pairs else False
    header = (["reader"] if by_reader else []) + ["comparison", "difference", "std. error"] + \
        (["df"] if with_df else []) + [statistic, "p", "95 % CI"]
    rows = [([p["reader"]] if by_reader else []) + [f"{p['pair'][0]} − {p['pair'][1]}", f"{p['difference']:.5f}",
             f"{p['stderr']:.5f}"] + ([f"{p['df']:.2f}"] if with_df else []) +
            [f"{p[statistic]:.3f}", f"{p['p']:.4f}", _ci(p["ci"])] for p in pairs]
    return _table(header, rows)


def study_markdown(result: dict[str, Any], source: str) -> str:
    design = result["design"]
    treatments, readers = design["treatments"], design["readers"]
    lines = [f"# Reader study: `{source}`", "",
             f"{len(treatments)} treatments, {len(readers)} readers, {design['cases']} cases ({design['normal']} normal, "
             f"{design['abnormal']} abnormal); {design['auc']} AUC; covariances by the {design['covariance']}. "
             "Obuchowski–Rockette analysis with Hillis's (2007) denominator degrees of freedom, as the Iowa OR-DBM "
             "MRMC program computes it (checked against its output on the Van Dyke data to 4 decimals).", "",
             "## Reader AUCs", "", "| reader | " + " | ".join(treatments) + " |", "|---" * (len(treatments) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(_f(result["reader_auc"][t][r]) for t in treatments) + " |" for r in readers]
    lines += ["| **mean** | " + " | ".join(f"**{_f(result['auc'][t])}**" for t in treatments) + " |", "",
              "## ANOVA of the reader AUCs", "", "| source | SS | df | MS |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['SS']:.8f} | {v['df']} | {v['MS']:.8f} |"
              for k, v in result["anova"].items() if k != "R_within_treatment"]
    within = result["anova"]["R_within_treatment"]
    lines += ["", "MS(R) within each treatment: " + ", ".join(f"{t} {v:.8f}" for t, v in within.items()),
              "", "## Variance components (OR; ANOVA estimates, which can be negative)", "",
              "| component | estimate |", "|---|---|"]
    lines += [f"| {k} | {v:.8f} |" for k, v in result["or_components"].items()]
    lines += ["", "DBM equivalents: " + ", ".join(f"{k} {v:.8f}" for k, v in result["dbm_components"].items()), ""]
    rrrc, frrc, rrfc = result["rrrc"], result["frrc"], result["rrfc"]
    lines += ["## 1. Random readers and random cases (results apply to both populations)", "",
              f"F({rrrc['ndf']}, {rrrc['ddf']:.2f}) = {rrrc['F']:.4f}, p = {rrrc['p']:.4f} "
              f"(error term {rrrc['error_term']:.8f} = MS(T*R) + r·max(Cov2 − Cov3, 0)).", ""]
    lines += _pairs(rrrc["pairs"], "t") + [""] + _table(
        ["treatment", "AUC", "std. error", "df", "95 % CI", "Cov2"],
        [[s["treatment"], f"{s['auc']:.4f}", f"{s['stderr']:.5f}", f"{s['df']:.2f}", _ci(s["ci"]), f"{s['cov2']:.8f}"]
         for s in rrrc["single"]])
    lines += ["", "## 2. Fixed readers and random cases (these readers only)", "",
              f"χ²({frrc['df']}) = {frrc['chi2']:.4f}, p = {frrc['p']:.4f}.", ""]
    lines += _pairs(frrc["pairs"], "z") + [""] + _table(
        ["treatment", "AUC", "std. error", "95 % CI", "Var(error)", "Cov2"],
        [[s["treatment"], f"{s['auc']:.4f}", f"{s['stderr']:.5f}", _ci(s["ci"]), f"{s['var_error']:.8f}",
          f"{s['cov2']:.8f}"] for s in frrc["single"]])
    lines += [""] + _pairs(frrc["readers"], "z", by_reader=True)
    lines += ["", "## 3. Random readers and fixed cases (these cases only)", "",
              f"F({rrfc['ndf']}, {rrfc['ddf']}) = {rrfc['F']:.4f}, p = {rrfc['p']:.4f}.", ""]
    lines += _pairs(rrfc["pairs"], "t") + [""] + _table(
        ["treatment", "AUC", "MS(R)", "std. error", "df", "95 % CI"],
        [[s["treatment"], f"{s['auc']:.4f}", f"{s['ms_r']:.8f}", f"{s['stderr']:.5f}", str(s["df"]), _ci(s["ci"])]
         for s in rrfc["single"]])
    lines += _study_lines(result.get("study"))
    lines += ["", "References: Obuchowski & Rockette 1995; Hillis et al. 2005; Hillis 2007. The data are in "
              "`study.imrmc` and `study.lrc` for iMRMC (FDA) and the Iowa program or RJafroc/MRMCaov.", ""]
    return "\n".join(lines)


def _study_lines(extra: dict[str, Any] | None) -> list[str]:
    """What a study read in PneumoScan adds: the binary calls, reading times, the model alone."""
    if not extra:
        return []
    lines = ["", f"## 4. The study's other figures ({extra['target']}, {extra['design']} design)", "",
             "Binary calls (\"present\") against the truth, and mean seconds per case:", ""]
    lines += _table(["arm", "reader", "sensitivity", "specificity", "mean seconds"],
                    [[arm, reader, f"{v['sensitivity']:.4f}", f"{v['specificity']:.4f}",
                      "—" if v["mean_seconds"] is None else f"{v['mean_seconds']:.1f}"]
                     for arm, readers in extra["calls"].items() for reader, v in readers.items()])
    timing = extra.get("reading_time")
    if timing:
        means = ", ".join(f"{a} {v:.1f} s" for a, v in timing["mean_seconds"].items())
        lines += ["", (f"Reading time: {means} per case (readers' means); {timing['difference']}: "
                       f"{timing['mean_difference']:+.1f} s (95 % CI {timing['ci'][0]:+.1f} to {timing['ci'][1]:+.1f}, "
                       "paired over readers).")]
    alone = extra.get("model_alone")
    if alone:
        lines += ["", f"PneumoScan alone (its probability as the score) on the {alone['cases']} cases it assessed"
                      + (f" ({alone['left_out']} left out)" if alone["left_out"] else "") + f": AUC {alone['auc']:.4f}; "
                      "readers' average on the same cases "
                      + ", ".join(f"{a} {v:.4f}" for a, v in alone["readers_average_auc"].items()) + "."]
    return lines


def roc_points(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The empirical ROC curve (false positive rate, true positive rate) over every threshold."""
    cuts = np.r_[np.inf, np.unique(scores)[::-1]]
    tpr = np.array([(scores[truth == 1] >= c).mean() for c in cuts])
    fpr = np.array([(scores[truth == 0] >= c).mean() for c in cuts])
    return fpr, tpr


def study_html(result: dict[str, Any], ratings, source: str) -> str:
    """The markdown tables as preformatted text beside one ROC panel per reader (a curve per
    treatment), as an embedded PNG: one file to mail to a statistician."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = len(ratings.readers)
    cols = min(r, 4)
    rows = (r + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for j, reader in enumerate(ratings.readers):
        ax = axes[j // cols][j % cols]
        for t, treatment in enumerate(ratings.treatments):
            fpr, tpr = roc_points(ratings.scores[t, j], ratings.truth)
            ax.plot(fpr, tpr, drawstyle="steps-post", lw=1.2,
                    label=f"{treatment} ({result['reader_auc'][treatment][reader]:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.6)
        ax.set(title=f"reader {reader}", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
    for k in range(r, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    picture = base64.b64encode(buffer.getvalue()).decode()
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Reader study {html.escape(source)}"
            f"</title><style>body{{font:14px system-ui,sans-serif;margin:1.5em}} pre{{white-space:pre-wrap}}</style>"
            f"</head><body><h1>Reader study: {html.escape(source)}</h1>"
            f"<img alt=\"empirical ROC curves per reader and treatment\" src=\"data:image/png;base64,{picture}\">"
            f"<pre>{html.escape(study_markdown(result, source))}</pre></body></html>\n")
