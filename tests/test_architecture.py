"""The house as docs/ARCHITECTURE.md draws it: redrawn from the imports, its rules kept, and the
linter clean on src/."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _house():
    spec = importlib.util.spec_from_file_location("house", ROOT / "tools" / "house.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_architecture_page_is_the_house_the_imports_draw(tmp_path):
    """tools/house.py --check: no circle, no broken rule, and the page's table is today's."""
    check = subprocess.run([sys.executable, str(ROOT / "tools" / "house.py"), "--check"], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    house = _house()
    arrows, floors, lines = house.house()
    assert floors["labels"] == 1 and floors["apps"] == max(floors.values())
    assert all(floors[room] > floors[t] for room, targets in arrows.items() for t in targets if t != "torch")
    picture = tmp_path / "house.png"
    house.draw(arrows, floors, lines, picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000
    assert (ROOT / "docs" / "architecture.png").exists()


def test_the_rules_catch_a_forbidden_import():
    house = _house()
    arrows = {"store": {"labels", "torch"}, "predict": {"training", "crop"}, "data": {"apps"}, "labels": set()}
    broken = house.broken_rules(arrows)
    assert any(b.startswith("store imports torch") for b in broken)
    assert any(b.startswith("predict imports training") for b in broken)
    assert any(b.startswith("data imports apps") for b in broken)
    assert len(broken) == 3
    doc = f"a\n{house.BEGIN}\nold\n{house.END}\nb"
    assert house.with_sheet(doc, "new") == f"a\n{house.BEGIN}\nnew\n{house.END}\nb"


def test_the_store_and_the_monitor_load_without_pytorch():
    code = ("import sys; import pneumoscan.store.db, pneumoscan.store.review, pneumoscan.store.study, "
            "pneumoscan.monitoring.watch, pneumoscan.monitoring.report, pneumoscan.errors; "
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


def test_ruff_finds_nothing_in_src():
    """The rules in pyproject.toml (errors, imports, bugbear, blind excepts, complexity ≤ 15)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    run = subprocess.run([ruff, "check", "src/", "--output-format", "concise"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_rooms_and_functions_stay_small():
    """No module of src/pneumoscan over 400 lines and no function over 80 (Alembic's migration
    scripts apart: a migration is written once and never edited)."""
    import ast

    package = ROOT / "src" / "pneumoscan"
    modules = [p for p in package.rglob("*.py") if "migrations" not in p.parts]
    big = {str(p.relative_to(package)): n for p in modules if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big
    long = set()
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.add(f"{path.relative_to(package)}:{node.name}")
    assert not long, sorted(long)


def test_mypy_finds_nothing_in_src():
    """mypy over the whole package, as pyproject.toml configures it."""
    import tomllib

    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert files == ["src/pneumoscan"]
    mypy = shutil.which("mypy") or str(Path(sys.executable).with_name("mypy"))
    run = subprocess.run([mypy, "--no-error-summary"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
