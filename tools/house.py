"""The house drawn from its imports: the rooms of ``src/pneumoscan`` (each sub-package, each
top-level module), the arrows between them (who imports whom, at any depth of a function), their
floors (a room sits one floor above the highest room it imports), and the rules of what may import
what. ``docs/ARCHITECTURE.md`` holds the sheet this writes between its markers and the picture;
``tests/test_architecture.py`` redraws both and fails when the documents are stale or a rule breaks.

    python tools/house.py            # check the rules, rewrite docs/architecture.png and the sheet
    python tools/house.py --check    # only check (exit 1 with the broken rule or the stale sheet)
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "pneumoscan"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PICTURE = ROOT / "docs" / "architecture.png"
BEGIN, END = "<!-- house: begin (tools/house.py writes this) -->", "<!-- house: end -->"

#: What may import what: (room, rooms it must never import, why).
RULES = (
    ("*", {"apps"}, "the faces (CLI, server, listener) sit on top: nothing below imports them"),
    ("store", {"torch", "predict", "classify", "training"},
     "the results store and the review commands run without PyTorch"),
    ("monitoring", {"torch", "predict", "classify", "training"},
     "monitoring reads the store's records, never the models"),
    ("errors", {"*"}, "the error base imports nothing of the project"),
    ("labels", {"*"}, "the label order is the bottom of the house"),
)
#: Rooms below these never import the training package (prediction does not need it).
PIPELINE = {"predict", "classify", "segment", "explain", "gate", "crop", "io", "reading", "measure", "maskquality",
            "outputs", "backends", "enhance", "clinical", "modelfile"}


def room_of(path: Path) -> str:
    """``apps`` for src/pneumoscan/apps/cli/run.py, ``predict`` for src/pneumoscan/predict.py."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported(path: Path) -> set[str]:
    """Rooms (and ``torch``) that the module imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        if isinstance(node, ast.ImportFrom) and node.module == "pneumoscan":
            names = [f"pneumoscan.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")
            if top[0] == "torch":
                found.add("torch")
            elif top[0] == "pneumoscan" and len(top) > 1 and \
                    ((PACKAGE / top[1]).is_dir() or (PACKAGE / f"{top[1]}.py").is_file()):
                found.add(top[1])
    return found


def house() -> tuple[dict[str, set[str]], dict[str, int], dict[str, int]]:
    """Arrows (room → rooms it imports, ``torch`` apart), floors, and lines per room."""
    arrows: dict[str, set[str]] = defaultdict(set)
    lines: dict[str, int] = defaultdict(int)
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:  # Alembic's scripts, run by Alembic
            continue
        room = room_of(path)
        lines[room] += len(path.read_text(encoding="utf-8").splitlines())
        arrows[room] |= imported(path) - {room}
    floors: dict[str, int] = {}

    def floor(room: str, seen: tuple[str, ...] = ()) -> int:
        if room in seen:
            raise SystemExit(f"a circle of imports: {' → '.join(seen + (room,))}")
        if room not in floors:
            below = [floor(r, seen + (room,)) for r in arrows[room] if r != "torch"]
            floors[room] = 1 + max(below, default=0)
        return floors[room]

    for room in list(arrows):
        floor(room)
    return dict(arrows), floors, dict(lines)


def broken_rules(arrows: dict[str, set[str]]) -> list[str]:
    """Every import that breaks :data:`RULES` or :data:`PIPELINE`, in words."""
    broken = []
    for room, targets in sorted(arrows.items()):
        for who, banned, why in RULES:
            if who not in ("*", room):
                continue
            hits = sorted(t for t in targets if "*" in banned or t in banned)
            broken += [f"{room} imports {t}: {why}" for t in hits]
        if room in PIPELINE and "training" in targets:
            broken.append(f"{room} imports training: prediction never needs the training package")
    return broken


def sheet(arrows: dict[str, set[str]], floors: dict[str, int]) -> str:
    """The house in words, top floor first: each room and what it imports (sizes are in the
    picture only, so that the page goes stale when the structure changes, not at every edit)."""
    out = ["| floor | room | imports |", "|---|---|---|"]
    for room in sorted(floors, key=lambda r: (-floors[r], r)):
        name = f"`{room}/`" if (PACKAGE / room).is_dir() else f"`{room}.py`"
        out.append(f"| {floors[room]} | {name} | {', '.join(sorted(arrows[room])) or '–'} |")
    return "\n".join(out)


def draw(arrows: dict[str, set[str]], floors: dict[str, int], lines: dict[str, int], out: Path) -> None:
    """Rooms as boxes on their floors (area ~ lines), arrows from each room down to what it imports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_floor: dict[int, list[str]] = defaultdict(list)
    for room in sorted(floors, key=lambda r: (-lines[r], r)):
        by_floor[floors[room]].append(room)
    widest = max(len(v) for v in by_floor.values())
    where = {room: ((i + 0.5) * widest / len(rooms), f) for f, rooms in by_floor.items() for i, room in enumerate(rooms)}
    fig, ax = plt.subplots(figsize=(max(10, 1.6 * widest), 1.3 * max(floors.values()) + 1))
    for room, targets in arrows.items():
        for target in targets - {"torch"}:
            (x0, y0), (x1, y1) = where[room], where[target]
            ax.annotate("", xy=(x1, y1 + 0.18), xytext=(x0, y0 - 0.18),
                        arrowprops={"arrowstyle": "->", "color": "#9ab", "lw": 0.7, "alpha": 0.7})
    for room, (x, y) in where.items():
        package = (PACKAGE / room).is_dir()
        ax.text(x, y, f"{room}{'/' if package else ''}\n{lines[room]:,}", ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": "#fde7c8" if package else "#e3eefc",
                      "ec": "#c33" if "torch" in arrows[room] else "#888"})
    ax.set_xlim(0, widest)
    ax.set_ylim(0.4, max(floors.values()) + 0.6)
    ax.set_yticks(range(1, max(floors.values()) + 1))
    ax.set_ylabel("floor (imports only rooms below)")
    ax.set_xticks([])
    ax.set_title("src/pneumoscan: rooms (lines), arrows to what each imports; red edge: imports PyTorch "
                 "(drawn by tools/house.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def with_sheet(doc: str, text: str) -> str:
    """``doc`` with the sheet between the markers replaced by ``text``."""
    head, rest = doc.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check only; write nothing")
    parser.add_argument("--picture", type=Path, default=PICTURE, help="where to draw the house")
    args = parser.parse_args(argv)
    arrows, floors, lines = house()
    problems = broken_rules(arrows)
    doc = DOC.read_text(encoding="utf-8")
    fresh = with_sheet(doc, sheet(arrows, floors))
    if args.check and fresh != doc:
        problems.append(f"{DOC.relative_to(ROOT)} is stale: run python tools/house.py")
    for problem in problems:
        print(problem, file=sys.stderr)
    if not args.check:
        DOC.write_text(fresh, encoding="utf-8")
        draw(arrows, floors, lines, args.picture)
        print(f"{len(floors)} rooms on {max(floors.values())} floors, "
              f"{sum(len(t - {'torch'}) for t in arrows.values())} arrows; wrote {args.picture} and the sheet in {DOC}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
