"""What every command shares: the Typer app, one-line errors, tables, input discovery, the output
folder check and loading the Predictor."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="PneumoScan: chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


console = Console(soft_wrap=True)


err = Console(stderr=True, soft_wrap=True)  # one message, one line: greppable, never re-wrapped


DbOption = Annotated[Optional[str], typer.Option(
    "--db", envvar="PNEUMOSCAN_DB", help="Results store: a database URL (postgresql://user@host/db, "
    "sqlite:///file) or a SQLite file path; $PNEUMOSCAN_DB when omitted.")]


def open_store(db: str | None, *, create: bool = True):
    """The results store at ``db`` (or the default one), or a one-line error."""
    try:
        from pneumoscan.store.db import Store, StoreError
    except ImportError:
        fail("the results store needs the store extra: pip install 'pneumoscan[store]'")
    try:
        return Store(db, create=create)
    except StoreError as exc:
        fail(str(exc))


def output_lock(out: Path):
    """An exclusive lock on ``out`` for this process's life (released at exit or crash; the lock
    file lives in the temporary folder, named by a hash of the folder's real path, so ``out``
    holds only results): two runs writing one folder would interleave or overwrite each other's
    records."""
    import hashlib
    import tempfile

    from filelock import FileLock, Timeout

    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:20]
    lock = FileLock(str(Path(tempfile.gettempdir()) / f"pneumoscan-out-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        fail(f"another PneumoScan run is writing to {out}; wait for it to finish, or give another --out")
    return lock


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def numbers(text: str, message: str, count: int | None = None,
            valid: Callable[[float], bool] = lambda _: True) -> tuple[float, ...]:
    """An option's comma-separated numbers (``count`` of them when given, each ``valid``), or the
    one-line usage error ``message``: one parser for --fractions, --betas and --domain-weights."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count) or not all(valid(v) for v in values):
        fail(message)
    return values


def print_table(title: str, frame) -> None:
    """A rich table on a terminal; plain aligned text in logs and pipes (never truncated)."""
    if not console.is_terminal:
        console.print(f"{title}\n{frame.to_string(index=False)}", highlight=False)
        return
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(str(column), justify="left" if frame[column].dtype == object else "right")
    for values in frame.itertuples(index=False):
        table.add_row(*(str(v) for v in values))
    console.print(table)


def need_extra(extra: str, what: str, *modules: str) -> None:
    """A one-line usage error naming the extra to install when one of ``modules`` is missing."""
    from importlib.util import find_spec

    if any(find_spec(module) is None for module in modules):
        fail(f"{what} needs the {extra} extra: pip install 'pneumoscan[{extra}]'")


BackendOption = Annotated[str, typer.Option(
    help="auto (ONNX Runtime on the CPU when installed, exported once per model pair into the user "
         "cache; else PyTorch), onnx or torch.")]


DeviceOption = Annotated[str, typer.Option(help="cpu, or cuda[:N] for a GPU (PyTorch backend).")]


def _quiet(value: bool) -> bool:
    from pneumoscan.progress import set_quiet

    return set_quiet(value)


QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", callback=_quiet, help="No progress bars or status lines on stderr (results, warnings "
                                           "and errors still show).")]


def _print_version(value: bool) -> None:
    """``--version``: answered before any command is required (an eager option)."""
    if value:
        from pneumoscan import __version__

        console.print(f"pneumoscan {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """PneumoScan: chest X-ray findings with lung segmentation, DenseNet-121 and Grad-CAM."""


Dir = Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, dir_okay=True)]


def load_predictor(seg_model: Path | None, model: Path | None, *, backend: str, device: str,
                   allow_model_mismatch: bool, onnx: Path | None = None):
    """The one Predictor the commands share; a clear one-line error for anything that stops it.
    Says what it is doing first (loading takes seconds) and how long it took."""
    import time

    started = time.perf_counter()
    err.print("loading models …", highlight=False)
    from pneumoscan.modelfile import ModelFileError
    from pneumoscan.predict import Predictor

    def told(message: str) -> None:
        err.print(escape(message), highlight=False)

    try:
        if onnx:
            predictor = Predictor.from_onnx(onnx, allow_model_mismatch=allow_model_mismatch)
        else:
            predictor = Predictor.from_paths(seg_model, model, allow_model_mismatch=allow_model_mismatch,
                                             backend=backend, device=device, progress=told)
    except (ModelFileError, FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc))
    err.print(f"models ready ({predictor.classifier.backend}) in {time.perf_counter() - started:.1f} s",
              highlight=False)
    return predictor


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def is_regular(path: Path) -> bool:
    """Only regular files are read: a FIFO or device named x.png would block or never end."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def expand_inputs(paths: list[Path], skip: Path | None = None) -> list[Path]:
    """Files as given; folders searched recursively for PNG, JPEG and DICOM files (by extension,
    or by the DICOM magic for files without one), leaving out the folder ``skip`` (the run's own
    output: its overlays are not films). Anything but a regular file is skipped, said."""
    from pneumoscan.films import display_name, is_dicom_file

    found: list[Path] = []
    skip = skip.resolve() if skip is not None else None
    for path in paths:
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        if path.is_dir() and skip is not None:
            # realpath, not resolve(): a link loop in the folder must not stop the batch (resolve raises)
            candidates = [p for p in candidates if not Path(os.path.realpath(p)).is_relative_to(skip)]
        for p in candidates:
            if not p.exists():
                found.append(p)  # reported per file as unreadable, the batch goes on
            elif not is_regular(p):
                if not p.is_dir():
                    err.print(f"[yellow]skipped:[/] {escape(display_name(p))}: not a regular file", highlight=False)
            elif path.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES and not (
                    p.suffix.lower() in ("", ".dicom", ".ima") and is_dicom_file(p)):
                continue
            else:
                found.append(p)
    return found


def gather_inputs(paths: list[Path], out: Path) -> list[Path]:
    """The image files to process (or a clean exit when there are none) and a ready output folder."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder (it is created if missing)")
    missing = [p for p in paths if not p.exists()]
    if missing and len(missing) == len(paths):  # a typo: said at once, before any model loads
        fail(f"no such file or folder: {', '.join(map(str, missing[:3]))}{' …' if len(missing) > 3 else ''}")
    for path in missing:  # beside real inputs: listed as an error record, the batch goes on
        err.print(f"[yellow]not found:[/] {escape(str(path))} (listed as an error; the other inputs go on)",
                  highlight=False)
    files = expand_inputs(paths, skip=out)
    if not files:
        fail("no PNG, JPEG or DICOM files found in the given paths")
    ensure_writable(out, "--out")
    return files


def ensure_writable(folder: Path, option: str) -> None:
    """Create ``folder`` and prove it takes a byte (read-only mounts, full disks and permissions
    all show here, before any film is read), else a one-line usage error."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as exc:
        fail(f"cannot write to {option} {folder}: {exc.strerror or exc}")
