"""The results store and its review loop: ``pneumoscan review migrate | readers | export | stats``
(:mod:`pneumoscan.store`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumoscan.apps.cli.common import (
    DbOption,
    app,
    console,
    err,
    fail,
    open_store,
    print_table,
)

review_app = typer.Typer(help="The results store: schema migrations, readers, labels out (export) and agreement (stats).",
                         no_args_is_help=True)
readers_app = typer.Typer(help="Readers of the review page (each has a key).", no_args_is_help=True)
review_app.add_typer(readers_app, name="readers")
app.add_typer(review_app, name="review")



def spreadsheet_safe_table(table, keep: tuple[str, ...] = ()):
    """Every text cell (reader names, uploaded file names, notes) as a spreadsheet shows text,
    :func:`pneumoscan.outputs.writer.spreadsheet_safe`; the ``keep`` columns as they are."""
    import pandas as pd

    from pneumoscan.outputs.writer import spreadsheet_safe

    out = table.copy()
    for column in out.columns:
        if column not in keep and (out[column].dtype == object or pd.api.types.is_string_dtype(out[column])):
            out[column] = out[column].map(spreadsheet_safe)
    return out

@review_app.command("migrate")
def migrate(
    db: DbOption = None,
    to: Annotated[str, typer.Option(help="Revision: head (the newest), base (empty) or a revision id.")] = "head",
    down: Annotated[bool, typer.Option(help="Downgrade to --to (removes what later revisions added).")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="With --to base --down: yes, delete every result, review "
                                                    "and study.")] = False,
) -> None:
    """Bring the store's schema to a revision (Alembic); prints where it was and where it is."""
    if down and to == "base" and not yes:
        fail("--to base --down deletes every stored result, review and study, with no copy: back the store up, "
             "then add --yes")
    from pneumoscan.store.database import (
        StoreError,
        current_revision,
        head_revision,
        make_engine,
        migrate,
        shown,
        store_url,
    )

    url = store_url(db)
    try:
        engine = make_engine(url)
        try:
            before = current_revision(engine)
        finally:
            engine.dispose()
        after = migrate(url, to, down=down)
    except StoreError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - Alembic's own errors (an unknown revision) as one line
        fail(f"migration of {shown(url)} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    console.print(f"{shown(url)}: schema revision {before or 'none'} → {after or 'none (empty)'} "
                  f"(this PneumoScan's newest: {head_revision()})", highlight=False)


@readers_app.command("add")
def readers_add(
    name: Annotated[str, typer.Argument(help="The reader's name as the audit trail shows it (not a patient's!).")],
    db: DbOption = None,
    adjudicator: Annotated[bool, typer.Option(help="Mark as an adjudicator (export --adjudicator NAME uses them).")] = False,
) -> None:
    """A new reader; prints their key once (the store keeps only its SHA-256)."""
    from pneumoscan.store.db import StoreError

    with open_store(db) as store:
        try:
            key = store.add_reader(name, adjudicator=adjudicator)
        except StoreError as exc:
            fail(str(exc))
    err.print(f"reader {name} added; their key (shown only now; the review page asks for it):", highlight=False)
    console.print(key, highlight=False)


@readers_app.command("list")
def readers_list(db: DbOption = None) -> None:
    """The readers and how many reviews each has given."""
    import pandas as pd

    with open_store(db, create=False) as store:
        rows = store.readers()
    if not rows:
        console.print("no readers yet: pneumoscan review readers add NAME", highlight=False)
        return
    print_table("readers", pd.DataFrame(rows))


def _reviews(store):
    from pneumoscan.store.db import StoreError
    from pneumoscan.store.review import current_reviews

    try:
        return current_reviews(store.review_rows())
    except StoreError as exc:
        fail(str(exc))


@review_app.command("export")
def export(
    out: Annotated[Path, typer.Option(help="The manifest CSV to write (evaluate, calibrate, compare and train read it).")],
    db: DbOption = None,
    adjudicator: Annotated[str | None, typer.Option(
        help="Take this reader's labels where they read a film (else the readers' majority).")] = None,
    split: Annotated[str, typer.Option(help="The split every exported film gets (choose thresholds on it with "
                                            "calibrate; keep other films for the test).")] = "val",
    source: Annotated[str, typer.Option(help="The manifest's source name for these films.")] = "site",
) -> None:
    """Reviewed films as a labelled manifest: per label the readers' majority (a tie is left
    empty), or the adjudicator's; films the readers disagreed on are listed beside it
    (OUT.disagreements.csv) and films without a kept file (OUT.left_out.csv)."""
    from pneumoscan.data.manifest import write_manifest
    from pneumoscan.store.review import export_manifest

    if out.is_dir():
        fail(f"--out {out} is a folder: give the manifest's file name (for example {out / 'site.csv'})")
    with open_store(db, create=False) as store:
        reviews = _reviews(store)
        if adjudicator and adjudicator not in set(reviews["reader"]):
            fail(f"--adjudicator {adjudicator}: no review by that reader (readers: "
                 f"{', '.join(sorted(set(reviews['reader']))) or 'none'})")
        manifest, left_out, disagreements = export_manifest(reviews, adjudicator=adjudicator, split=split, source=source)
    if manifest.empty and left_out.empty:
        fail("no reviewed films in the store yet")
    write_manifest(spreadsheet_safe_table(manifest, keep=("path",)), out)  # paths are absolute: never a formula
    stem = out.with_suffix("")
    spreadsheet_safe_table(disagreements).to_csv(f"{stem}.disagreements.csv", index=False)
    spreadsheet_safe_table(left_out).to_csv(f"{stem}.left_out.csv", index=False)
    console.print(f"{len(manifest)} reviewed films → {out} (split {split}, labels by "
                  f"{'adjudicator ' + adjudicator + ' where they read, else ' if adjudicator else ''}majority of readers); "
                  f"{disagreements['film_id'].nunique() if len(disagreements) else 0} films with readers disagreeing "
                  f"→ {stem}.disagreements.csv" + (f"; {len(left_out)} films without a kept file left out → "
                                                   f"{stem}.left_out.csv" if len(left_out) else ""), highlight=False)


@review_app.command("stats")
def stats(
    db: DbOption = None,
    out: Annotated[Path | None, typer.Option(help="Also write the figures as JSON here.")] = None,
) -> None:
    """Model–reader agreement per assessed label (Cohen's kappa per reader and pooled; the model's
    sensitivity and specificity against the readers' majority) and, with two or more readers,
    Cohen's kappa between each pair of readers."""
    import json

    import pandas as pd

    from pneumoscan.store.review import agreement

    if out is not None and out.is_dir():
        fail(f"--out {out} is a folder: give the JSON file's name")
    with open_store(db, create=False) as store:
        figures = agreement(_reviews(store))
    if not figures["labels"]:
        fail("no reviews of assessed labels in the store yet")

    def shown(value):
        return "—" if value is None else value

    rows = [{"label": label, "n": e["n"], "model κ": shown(e["model_kappa"]),
             **{f"κ {r}": shown(v["kappa"]) for r, v in e["per_reader"].items()},
             "readers +/−": f"{e['positives']}/{e['negatives']}", "sensitivity": shown(e["sensitivity"]),
             "specificity": shown(e["specificity"]),
             **{f"κ {pair}": shown(v["kappa"]) for pair, v in e["inter_reader"].items()}}
            for label, e in figures["labels"].items()]
    print_table(f"{figures['reviews']} current reviews of {figures['results']} results by "
                f"{len(figures['readers'])} readers ({', '.join(figures['readers'])})", pd.DataFrame(rows).fillna("—"))
    if out:
        out.write_text(json.dumps(figures, indent=1))
        console.print(f"figures → {out}", highlight=False)
