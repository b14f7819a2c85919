"""``monitor.json`` and ``monitor.html``: the windows on a time axis, each statistic's effect
against the line an alert needs, the expected and reviewed AUC, the population and verdict mix,
and the alerts with the films to open on /review."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def figures(report: dict[str, Any]) -> dict[str, str]:
    """The page's plots as PNG data URIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pneumoscan.monitoring.watch import MIN_KS, MIN_TVD

    windows = report["windows"]
    x = np.arange(len(windows))
    ticks = [w["since"][:10] for w in windows]
    alerted = {(a["window"], a["statistic"]) for a in report["alerts"]}
    out = {}
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for ax, kind, line, key in ((axes[0], "categorical", MIN_TVD, "tvd"), (axes[1], "continuous", MIN_KS, "d")):
        names = [n for n, t in windows[0]["tests"].items() if t["kind"] == kind] if windows else []
        for name in names:
            values = [w["tests"][name].get(key, 0.0) for w in windows]
            ax.plot(x, values, lw=1, label=name)
            hits = [k for k, w in enumerate(windows) if (w["index"], name) in alerted]
            ax.scatter(hits, [values[k] for k in hits], color="red", zorder=3, s=30)
        ax.axhspan(0, line, color="0.9", zorder=0)
        ax.axhline(line, color="0.5", ls="--", lw=1)
        ax.set_ylabel("total variation" if kind == "categorical" else "KS D")
        ax.set_title(f"{kind} statistics against the reference (grey: below the effect an alert needs; red: alert)",
                     fontsize=9)
        ax.legend(fontsize=6, ncol=4, loc="upper left")
    axes[1].set_xticks(x[:: max(1, len(x) // 12)], ticks[:: max(1, len(x) // 12)], rotation=30, fontsize=7)
    out["drift"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(11, 3.5))
    for label in report["labels"]:
        expected = [w["performance"].get(label, {}).get("expected_auc") for w in windows]
        if not any(v is not None for v in expected):
            continue
        colour = ax.plot(x, [np.nan if v is None else v for v in expected], lw=1.2, label=f"{label} expected")[0].get_color()
        observed = [w["performance"].get(label, {}).get("observed_auc") for w in windows]
        ax.scatter(x, [np.nan if v is None else v for v in observed], color=colour, marker="x", s=25)
        reference = report["reference"]["performance"].get(label, {}).get("expected_auc")
        if reference is not None:
            ax.axhline(reference, color=colour, ls=":", lw=1)
    ax.set_ylabel("AUC")
    ax.set_title("expected AUC from the calibrated probabilities (lines; dotted: the reference's), "
                 "AUC against reviewers' labels (×)", fontsize=9)
    ax.legend(fontsize=6, ncol=5, loc="lower left")
    ax.set_xticks(x[:: max(1, len(x) // 12)], ticks[:: max(1, len(x) // 12)], rotation=30, fontsize=7)
    out["performance"] = _png(fig)
    plt.close(fig)
    return out


def write_report(report: dict[str, Any], out: Path, title: str) -> None:
    """``monitor.json`` and ``monitor.html`` in ``out`` (written whole, then renamed)."""
    from pneumoscan.modelfile import atomic_write_bytes
    from pneumoscan.monitoring import summary_line

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "monitor.json", json.dumps(report, indent=1, default=str).encode(), sync=False)
    plots = figures(report) if report["windows"] else {}
    def film_links(alert: dict[str, Any]) -> str:
        pairs = zip(alert["films"][:8], alert["review_links"][:8])
        return " ".join(f"<a href={html.escape(link)!r}>{i}</a>" for i, link in pairs)

    rows = "".join(
        f"<tr><td>{a['window']}</td><td>{html.escape(a['since'][:19])}</td><td>{html.escape(a['what'])}</td>"
        f"<td>{a['p_corrected']:.2g}</td><td>{film_links(a)}</td></tr>"
        for a in report["alerts"])
    header = ("<tr><th>window</th><th>since</th><th>what moved</th><th>p (corrected)</th>"
              "<th>films to look at (open on /review)</th></tr>")
    alerts = (f"<table>{header}{rows}</table>" if rows
              else '<p class="none">None: every window looks like the reference.</p>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }}
img {{ max-width: 100%; }} .none {{ color: #2a7; }} .note {{ color: #555; }}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary_line(report))}. Reference: the first {report['reference']['films']:,} films
({html.escape(report['reference']['since'][:10])} to {html.escape(report['reference']['until'][:10])}).
{html.escape(report['settings']['correction'])}, family-wise α {report['settings']['alpha']}; an alert also needs a total
variation of {report['settings']['min_effect']['categorical_tvd']} (categories) or a KS D of
{report['settings']['min_effect']['continuous_ks_d']} (measurements).</p>
<h2>Alerts</h2>
{alerts}
<h2>Drift</h2>{f'<img alt="drift against the reference, per window" src="{plots["drift"]}">' if plots else ''}
<h2>Performance</h2>{f'<img alt="expected and reviewed AUC per window" src="{plots["performance"]}">' if plots else ''}
<p class="note">Expected figures assume the probabilities stay calibrated for the films that arrive: a drift
alert above says where that may no longer hold. Research use only.</p>
</body></html>
"""
    atomic_write_bytes(out / "monitor.html", page.encode(), sync=False)
