"""``pneumoscan monitor``: a site watched from its results store (:mod:`pneumoscan.monitoring`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from pneumoscan.apps.cli.common import (
    DbOption,
    app,
    console,
    ensure_writable,
    err,
    fail,
    open_store,
)


def parse_every(text: str | None) -> float | None:
    """``7d``, ``12h`` or ``2w`` → days; None when not given; one line on anything else."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([hdw])\s*", text)
    if not match or float(match.group(1)) <= 0:
        fail(f"--every {text!r}: a period like 7d, 12h or 2w")
    return float(match.group(1)) * {"h": 1 / 24, "d": 1.0, "w": 7.0}[match.group(2)]


@app.command("monitor")
def monitor(
    out: Annotated[Path, typer.Option(help="Folder for monitor.json and monitor.html.")],
    db: DbOption = None,
    window: Annotated[int, typer.Option(min=20, help="Films per window (stored order).")] = 100,
    every: Annotated[str | None, typer.Option(help="Calendar windows instead: 7d, 12h, 2w.")] = None,
    reference: Annotated[int, typer.Option(min=20, help="The first N stored films are the reference.")] = 500,
    alpha: Annotated[float, typer.Option(min=1e-6, max=0.5, help="Family-wise false-alarm rate over all tests "
                                                                    "of all windows (Bonferroni).")] = 0.01,
    fail_on_alert: Annotated[bool, typer.Option(help="Exit with code 3 when any window has an alert (cron, CI).")] = False,
) -> None:
    """Drift in what arrives and what the model says, performance expected from the calibrated
    probabilities and observed from reviews, per window against the site's first films."""
    from pneumoscan.monitoring import read_store, summary_line
    from pneumoscan.monitoring.report import write_report
    from pneumoscan.monitoring.watch import monitor as run_monitor
    from pneumoscan.store.db import StoreError

    days = parse_every(every)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: give a folder")
    ensure_writable(out, "--out")
    with open_store(db, create=False) as store:
        try:
            rows, truth = read_store(store)
        except StoreError as exc:
            fail(str(exc))
        where = store.where
    if not rows:
        fail(f"{where} holds no results yet")
    err.print(f"{len(rows):,} stored results, {len(truth):,} reviewed; testing …", highlight=False)
    try:
        report = run_monitor(rows, reference=reference, window=None if days else window, every_days=days,
                             alpha=alpha, truth=truth)
    except ValueError as exc:
        fail(str(exc))
    write_report(report, out, f"PneumoScan monitor: {where}")
    console.print(f"{summary_line(report)} → {out / 'monitor.html'}", highlight=False)
    for alert in report["alerts"][:10]:
        err.print(f"alert, window {alert['window']} (since {alert['since'][:16]}): {alert['what']}", highlight=False)
    if fail_on_alert and report["alerts"]:
        raise typer.Exit(3)
