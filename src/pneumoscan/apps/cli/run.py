"""Running the models over files: ``predict`` (one process or Ray) and ``segment``; every record goes
through the one result writer (:mod:`pneumoscan.outputs.writer`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from pneumoscan.apps.cli.common import (
    BackendOption,
    DbOption,
    DeviceOption,
    QuietOption,
    app,
    console,
    ensure_writable,
    err,
    fail,
    gather_inputs,
    load_predictor,
    need_extra,
    open_store,
    output_lock,
)
from pneumoscan.errors import PneumoScanError
from pneumoscan.progress import bar as progress_bar


@app.command()
def segment(
    images: Annotated[list[Path], typer.Argument(help="X-ray files or folders (PNG, JPEG, DICOM).")],
    out: Annotated[Path, typer.Option(help="Folder for masks, overlays and segment.jsonl.")],
    model: Annotated[Optional[Path], typer.Option(help="Lung model file; the shipped one if omitted.")] = None,
    heart_model: Annotated[Optional[Path], typer.Option(help="Heart model file; the shipped one if omitted.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    quiet: QuietOption = False,
) -> None:
    """Lung mask (NAME_mask.png), heart mask (NAME_heart.png), overlay and crop box for each X-ray,
    with the cardiothoracic ratio and each mask's quality; unreadable files are reported, not fatal."""
    import json

    import cv2

    from pneumoscan.evidence import heart_and_ratio
    from pneumoscan.films import display_name
    from pneumoscan.loading import load_heart
    from pneumoscan.measure import Measurements
    from pneumoscan.outputs.overlay import prediction_picture
    from pneumoscan.pipeline import read_segment_crop
    from pneumoscan.segment import LungSegmenter, load_default

    try:
        segmenter = LungSegmenter.load(model) if model else load_default()
        heart_segmenter = load_heart(heart_model)
    except (PneumoScanError, FileNotFoundError) as exc:
        fail(str(exc))
    if heart_segmenter is None:
        fail("no heart model is installed; give --heart-model FILE")
    from pneumoscan.outputs.writer import output_stems

    paths = gather_inputs(images, out)
    stems = iter(output_stems(paths))
    failures = 0
    with open(out / "segment.jsonl", "w") as log, progress_bar(len(paths), "segment") as bar:
        # The crop itself is not needed here; it is the shared path's by-product (a resize).
        for chunk in read_segment_crop(paths, segmenter, 8, batch=batch_size, threads=2):
            films = [item.segmented() for item in chunk]
            measured = iter(heart_and_ratio([f for f in films if f is not None], segmenter, heart_segmenter))
            for item, film in zip(chunk, films):
                record: dict[str, Any] = {"path": display_name(item.source), "box": None, "lung_fraction": None,
                                          "fallback": None, "cardiothoracic_ratio": None, "error": item.error}
                stem = next(stems)
                if film is not None:
                    seg = film.seg
                    quality, heart, ctr = next(measured)
                    record.update(box=list(seg.box), lung_fraction=round(seg.lung_fraction, 4),
                                  fallback=seg.fallback, cardiothoracic_ratio=ctr.value,
                                  cardiothoracic_ratio_reason=ctr.reason, mask_quality=quality.to_dict())
                    picture = prediction_picture(film.image.pixels, seg.mask, list(seg.box), seg.fallback, None, None,
                                                 None, heart=heart, measurements=Measurements(ctr),
                                                 caption=quality.caption())
                    try:  # a file is listed only once it is written
                        for kind, image in (("mask", seg.mask * 255), ("heart", heart * 255), ("overlay", picture)):
                            if not cv2.imwrite(str(out / f"{stem}_{kind}.png"), image):
                                raise OSError(f"could not write {stem}_{kind}.png")
                            record[kind] = f"{stem}_{kind}.png"
                    except (OSError, cv2.error) as exc:
                        record["error"] = f"{item.source}: output not written ({exc})"
                if record["error"] is not None:
                    failures += 1
                    err.print(f"[yellow]skipped:[/] {escape(record['error'])}", highlight=False)
                log.write(json.dumps(record) + "\n")
                bar.update(1)
    done = len(paths) - failures
    console.print(f"segmented {done} of {len(paths)} images → {out / 'segment.jsonl'}")
    if failures:
        raise typer.Exit(1)


def clinical_values(predictor, csv_path: Path | None, files: list[Path]) -> list[dict[str, Any] | None] | None:
    """Per input, the patient information ``--clinical-csv`` gives for it (matched by file name);
    None when there is no CSV. A model without clinical fields refuses a CSV it would ignore."""
    from pneumoscan.clinical import ClinicalError, read_clinical_csv

    if csv_path is None:
        return None
    spec = predictor.classifier.clinical
    if spec is None:
        fail("--clinical-csv was given, but this model does not use patient information")
    try:
        table = read_clinical_csv(csv_path, spec.names)
    except ClinicalError as exc:
        fail(str(exc))
    missing = sum(1 for f in files if f.name not in table)
    if missing:
        err.print(f"[yellow]note:[/] {missing} of {len(files)} images have no row in {csv_path}: their fields "
                  f"come from DICOM tags where there are any, else count as missing", highlight=False)
    return [table.get(f.name) for f in files]


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="X-ray files or folders (PNG, JPEG, DICOM).")],
    out: Annotated[Path, typer.Option(help="Folder for predictions and overlays.")] = Path("pneumoscan-out"),
    cam: Annotated[Optional[str], typer.Option(
        help="Grad-CAM: 'top' (a map per called finding, the most probable first), 'none', or class names, "
             "comma-separated (their maps first).")] = "top",
    fmt: Annotated[str, typer.Option("--format", help="json (predictions.jsonl) or csv (predictions.csv).")] = "json",
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
    onnx: Annotated[Optional[Path], typer.Option(help="Run through ONNX Runtime from this export folder.")] = None,
    backend: BackendOption = "auto",
    device: DeviceOption = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    read_threads: Annotated[int, typer.Option(
        min=0, help="Threads decoding files ahead of the models (on a GPU machine: about the CPU cores).")] = 2,
    dicom_out: Annotated[Optional[Path], typer.Option(
        help="Folder for DICOM results of DICOM inputs: SR (findings), SEG (lungs), Secondary Capture (overlay).")] = None,
    ray: Annotated[Optional[str], typer.Option(
        help="Run on Ray: 'local' (started here) or a cluster address; writes predictions.jsonl only, "
             "resumable (files already in it are skipped).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --ray: predictor actors (one model copy each).")] = 2,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="With --ray: GPUs per actor.")] = 0.0,
    overlays: Annotated[bool, typer.Option(help="Write NAME_overlay.png per image.")] = True,
    allow_model_mismatch: Annotated[bool, typer.Option(
        help="Run even if the classifier was trained on another lung model's crops.")] = False,
    force: Annotated[bool, typer.Option(
        help="Score images the input gate refuses as not frontal chest X-rays (marked in 'quality').")] = False,
    clinical_csv: Annotated[Optional[Path], typer.Option(
        help="Patient information for a model that fuses it: a CSV with a 'file' column (image file names) "
             "and the model's fields (e.g. age, sex, view); DICOM tags fill what it lacks.")] = None,
    db: DbOption = None,
    quiet: QuietOption = False,
) -> None:
    """Findings, probabilities, lung box and Grad-CAM overlay for each X-ray.

    Images that do not look like a frontal chest X-ray are not scored: their record says why
    (quality.reasons) unless --force is given. With --db every result also goes into the results
    store (for the review page); a store that fails is said per film, the files are written anyway."""
    from pneumoscan.outputs.writer import Outputs

    check_predict_options(fmt, onnx, seg_model, model, dicom_out, backend, device)
    files = gather_inputs(paths, out)
    _held = output_lock(out)  # held until predict returns; a second predict into --out stops here, before any model loads
    if ray is not None and db:
        fail("--db is not taken by --ray yet; run without --ray")
    store = open_store(db) if db else None  # a store that is down stops here, before any model loads
    predictor = load_predictor(seg_model, model, backend=backend, device=device,
                               allow_model_mismatch=allow_model_mismatch, onnx=onnx)
    try:
        cam = predictor.cam_class(cam)
    except ValueError as exc:
        fail(str(exc))
    given = clinical_values(predictor, clinical_csv, files)
    outputs = Outputs(out=out, fmt=fmt, overlays=overlays, dicom_out=dicom_out)
    if ray is not None and given is not None:
        fail("--clinical-csv is not taken by --ray yet; run without --ray (DICOM tags are read either way)")
    run = predictor.run_identity(force)
    if ray is not None:
        return predict_on_ray(files, outputs, run, ray=ray, workers=workers, gpus=gpus_per_worker,
                              seg_model=seg_model, model=model, backend=backend, device=device,
                              batch_size=batch_size)
    results = predictor.predict_many(files, cam=cam, keep_arrays=outputs.needs_arrays or store is not None, force=force,
                                     batch_size=batch_size, threads=read_threads, clinical=given)
    write_results(files, results, predictor, outputs, store, run, force)


def check_predict_options(fmt: str, onnx: Path | None, seg_model: Path | None, model: Path | None,
                          dicom_out: Path | None, backend: str, device: str) -> None:
    """predict's options that contradict each other or need an extra, refused in one line before
    the inputs are gathered and any model loads."""
    from pneumoscan.outputs.writer import FORMATS

    if fmt not in FORMATS:
        fail("--format must be json or csv")
    if onnx is not None and (model or seg_model):
        fail("--onnx DIR runs the models exported in DIR; --model and --seg-model would be ignored with it: "
             "export those models (pneumoscan export), or leave --onnx out")
    if dicom_out:
        need_extra("dicom", "--dicom-out", "highdicom")
        ensure_writable(dicom_out, "--dicom-out")
    if onnx is None:
        from pneumoscan.loading import check_backend

        try:
            check_backend(backend, device)  # the options, then the inputs and --out, before any model loads
        except ValueError as exc:
            fail(str(exc))


def write_results(files: list[Path], results: Iterable[Any], predictor, outputs, store, run: dict[str, Any],
                  force: bool) -> None:
    """Each film's files, its line in the records and the store, as its result comes (the films
    are read, segmented and scored lazily, in batches); a full disk stops the run after the film
    it failed on, with its record kept."""
    from pneumoscan.outputs.writer import NoRoom, RecordSink, output_stems, write_files, write_to_store

    with RecordSink(outputs, run=run) as sink, progress_bar(len(files), "predict") as bar:
        try:
            for path, stem, result in zip(files, output_stems(files), results):
                try:
                    record, full = write_files(result, path, stem, outputs, predictor), None
                except NoRoom as exc:  # keep this film's record (its file error said), then stop
                    record, full = exc.record, exc
                if store is not None:
                    write_to_store(store, record, result, None, name=path.name, path=path, run=run, source="predict")
                sink.write(record)
                tell(record, force)
                bar.update(1)
                if full:
                    raise full
        except OSError as exc:
            bar.close()
            stopped_writing(exc, sink.counts, len(files), outputs)
    finish(sink.counts, len(files), outputs, force)


def tell(record: dict, force: bool) -> None:
    """One line on stderr for a record that failed, was refused, or lost a file."""
    quality = record.get("quality") or {}
    path = escape(str(record["path"]))
    if record.get("error"):
        err.print(f"[yellow]failed:[/] {escape(record['error'])}", highlight=False)
    elif not quality.get("frontal_chest"):
        verb = "scored anyway (--force)" if force else "refused"
        err.print(f"[yellow]{verb}:[/] {path}: {quality.get('refused_as') or 'not a frontal chest X-ray'}: "
                  f"{escape('; '.join(quality.get('reasons', [])))}", highlight=False)
    for key in ("overlay_error", "dicom_error", "store_error"):
        if record.get(key):
            err.print(f"[yellow]failed:[/] {path}: {escape(record[key])}", highlight=False)


def finish(counts: dict, total: int, outputs, force: bool, skipped: int = 0) -> None:
    """The closing lines of ``predict`` (either way of running it) and its exit code."""
    failures = counts["errors"] + counts["failed_files"]
    console.print(f"{counts['written'] - failures} of {total - skipped} images → {outputs.target}"
                  + (f" ({skipped} already there, skipped)" if skipped else "")
                  + (f" (overlays in {outputs.out})" if outputs.overlays else "")
                  + (f"; {counts['refused']} not frontal chest X-rays "
                     f"({'scored anyway' if force else 'not scored; --force scores them'})" if counts["refused"] else ""))
    if outputs.dicom_out:
        console.print(f"DICOM results (SR, SEG, Secondary Capture) in {outputs.dicom_out}"
                      + (f"; {counts['not_dicom']} input(s) are PNG/JPEG, which get no DICOM results"
                         if counts["not_dicom"] else ""))
    summarise_run(outputs)
    if failures:
        raise typer.Exit(1)


def summarise_run(outputs) -> None:
    """summary.json and triage.html beside the predictions, and the counts on stderr."""
    from pneumoscan.outputs.summary import write_summary

    try:
        summary = write_summary(outputs.target, outputs.out)
    except OSError as exc:
        err.print(f"[yellow]note:[/] summary not written: {escape(exc.strerror or str(exc))}", highlight=False)
        return
    by_label = ", ".join(f"{label} {n}" for label, n in summary["called_by_label"].items() if label != "No Finding")
    verdicts = ", ".join(f"{n} {v}" for v, n in summary["by_verdict"].items() if n)
    err.print(escape("summary: " + ", ".join(f"{n} {s}" for s, n in summary["by_status"].items())
                     + (f"; verdicts: {verdicts}" if verdicts else "")
                     + (f"; called per finding: {by_label}" if by_label else "")
                     + f"; triage sheet {outputs.out / 'triage.html'}"), highlight=False)


def stopped_writing(exc: OSError, counts: dict, total: int, outputs) -> None:
    """A full or read-only output folder: one line saying what was kept, exit 1."""
    fail(f"cannot write to {exc.filename or outputs.out}: {exc.strerror or exc}; "
         f"stopped after {counts['written']} of {total} images, "
         f"whose records are in {outputs.target}; make room and run again", 1)


def predict_on_ray(files: list[Path], outputs, run: dict, *, ray: str, workers: int, gpus: float,
                   seg_model: Path | None, model: Path | None, backend: str, device: str, batch_size: int) -> None:
    """``predict --ray``: the same records and files, scored by an actor pool (each actor writes its
    films' overlays and DICOM results), appended in input order. Resumable: films already recorded
    by the same models and options are skipped, films that ended in an error are tried again, and
    a file made by other models or options is refused (never mixed, never taken as done)."""

    from pneumoscan.apps.cluster import ClusterError, predict_records
    from pneumoscan.films import display_name
    from pneumoscan.outputs.writer import (
        RecordSink,
        check_resumable,
        output_stems,
        recorded_paths,
    )

    force = run["force"]
    try:
        check_resumable(outputs, run)
    except ValueError as exc:
        fail(str(exc))
    done = recorded_paths(outputs.target)
    todo = [(str(f), stem) for f, stem in zip(files, output_stems(files)) if display_name(f) not in done]
    with RecordSink(outputs, append=True, run=run) as sink, \
            progress_bar(len(todo), "predict (ray)") as bar:
        try:
            for record in predict_records(todo, outputs, address=ray, workers=workers, batch_size=batch_size,
                                          seg=str(seg_model) if seg_model else None,
                                          cls_model=str(model) if model else None, backend=backend,
                                          device=device, gpus_per_worker=gpus, force=force):
                sink.write(record)
                tell(record, force)
                bar.update(1)
        except ClusterError as exc:
            fail(str(exc))
        except OSError as exc:
            bar.close()
            stopped_writing(exc, sink.counts, len(todo), outputs)
        except KeyboardInterrupt:
            bar.close()
            err.print(f"interrupted: {sink.counts['written']} of {len(todo)} films recorded in {outputs.target}; "
                      f"the same command goes on from there", highlight=False)
            raise typer.Exit(130) from None
    finish(sink.counts, len(files), outputs, force, skipped=len(files) - len(todo))
