"""The long-running faces: ``serve`` (REST API and web page) and ``listen`` (DICOM node, STOW-RS)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pneumoscan.apps.cli.common import (
    BackendOption,
    DbOption,
    DeviceOption,
    app,
    console,
    ensure_writable,
    err,
    fail,
    load_predictor,
    need_extra,
    open_store,
)


def store_and_kept_films(db: str | None, keep_films: Path | None):
    """The results store of ``--db`` (None without one), with ``--keep-films`` checked: it goes
    with a store (the export points at the kept copies) and must be writable."""
    if keep_films and not db:
        fail("--keep-films goes with --db (the results store)")
    store = open_store(db) if db else None
    if keep_films:
        ensure_writable(keep_films, "--keep-films")
    return store


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = 32.0,
    workers: Annotated[int, typer.Option(
        min=1, help="Images decoded at once (each may take ~0.8 GB for the largest accepted picture).")] = 1,
    queue: Annotated[int, typer.Option(min=0, help="Requests waiting beyond those; more get 503.")] = 8,
    upload_timeout: Annotated[float, typer.Option(min=1, help="Seconds an upload may take; slower ones get 408.")] = 300.0,
    min_upload_rate: Annotated[float, typer.Option(
        min=0, help="KiB/s an upload must average after its first 10 s, else 408 (slow senders cannot "
                    "hold the server's places).")] = 1.0,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="PNEUMOSCAN_API_KEY", help="Key required on every route but /health and / "
                                          "(header X-API-Key); needed off loopback.")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        help="Listen off loopback without an API key (anyone who reaches the port can use it).")] = False,
    allowed_hosts: Annotated[str, typer.Option(
        help="Comma-separated Host names to answer (default: loopback names and --host); '*' for any.")] = "",
    allow_model_mismatch: Annotated[bool, typer.Option(
        help="Run even if the classifier was trained on another lung model's crops.")] = False,
    slow_strikes: Annotated[int, typer.Option(
        min=0, help="Uploads from one address cut off as too slow (408) within a minute before that address "
                    "gets 429 for a minute; 0: never (behind a proxy that hides the clients' addresses).")] = 3,
    backend: BackendOption = "auto",
    device: DeviceOption = "cpu",
    db: DbOption = None,
    reader_header: Annotated[Optional[str], typer.Option(
        help="With --db: the site proxy's header naming the authenticated reader (e.g. X-Remote-User); "
             "trusted as sent, so only behind that proxy.")] = None,
    keep_films: Annotated[Optional[Path], typer.Option(
        help="With --db: keep each uploaded film here (named by its SHA-256), so reviewed films can be exported.")] = None,
) -> None:
    """REST API (POST /v1/predict, GET /health, /docs) and the web page at /; with --db every
    result is stored and radiologists review them at /review."""
    err.print("starting the server …", highlight=False)  # before the web stack's imports (about a second)
    try:
        import uvicorn

        from pneumoscan.apps.server import LOOPBACK_HOSTS, UploadPace, create_app
    except ImportError:
        fail("the server needs the web extra: pip install 'pneumoscan[web]'")
    loopback = host in LOOPBACK_HOSTS or host.startswith("127.")
    if not loopback and not api_key and not insecure_no_auth:
        fail(f"--host {host} listens beyond this machine: give --api-key (or PNEUMOSCAN_API_KEY), or "
             f"--insecure-no-auth if something in front of it authenticates")
    hosts = [h.strip() for h in allowed_hosts.split(",") if h.strip()] or \
        [*LOOPBACK_HOSTS, *([] if loopback or host in ("0.0.0.0", "::") else [host])]
    if reader_header and not db:
        fail("--reader-header goes with --db (the results store)")
    if reader_header and not api_key:
        err.print(f"warning: --reader-header {reader_header} without --api-key: anything that can reach this "
                  f"server can name a reader in that header; give --api-key, which the site proxy adds", highlight=False)
    store = store_and_kept_films(db, keep_films)
    predictor = load_predictor(seg_model, model, backend=backend, device=device,
                               allow_model_mismatch=allow_model_mismatch)
    app = create_app(predictor, max_upload_mb=max_upload_mb, workers=workers, queue=queue, api_key=api_key,
                     allowed_hosts=None if hosts == ["*"] else hosts,
                     pace=UploadPace(deadline_s=upload_timeout, min_rate=min_upload_rate * 1024),
                     slow_strikes=slow_strikes, store=store, reader_header=reader_header, keep_films=keep_films)
    console.print(f"PneumoScan on http://{host}:{port}/ (API docs at /docs); answering Host names: "
                  f"{', '.join(hosts)}; API key {'required' if api_key else 'not required'}"
                  + (f"; results stored in {store.where}, review page at /review" if store else ""), highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)  # "Uvicorn running on …": ready


def forward_targets(forward: str | None, forward_dicomweb: str | None) -> list[Any]:
    """--forward (HOST:PORT:AET, by C-STORE) and --forward-dicomweb (a service root, by STOW-RS),
    checked: one line for a malformed one."""
    from pneumoscan.apps.forward import Forward, StowForward

    targets: list[Any] = []
    try:
        targets += [Forward.parse(forward)] if forward else []
    except ValueError as exc:
        fail(str(exc))
    if forward_dicomweb:
        need_extra("dicom", "--forward-dicomweb", "dicomweb_client")
        if not forward_dicomweb.startswith(("http://", "https://")):
            fail(f"--forward-dicomweb {forward_dicomweb!r}: expected an http:// or https:// service root")
        targets.append(StowForward(forward_dicomweb.rstrip("/")))
    return targets


@app.command()
def listen(
    out: Annotated[Path, typer.Option(help="Folder for the DICOM results (SR, SEG, Secondary Capture) and predictions.jsonl.")],
    port: Annotated[int, typer.Option(help="TCP port for DICOM (C-STORE, C-ECHO).")] = 11112,
    ae_title: Annotated[str, typer.Option(help="This listener's AE title.")] = "PNEUMOSCAN",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    spool: Annotated[Optional[Path], typer.Option(help="Where received instances wait (default: OUT/.spool).")] = None,
    forward: Annotated[Optional[str], typer.Option(help="Send the results on by C-STORE to HOST:PORT:AET.")] = None,
    forward_dicomweb: Annotated[Optional[str], typer.Option(
        help="Send the results on by DICOMweb STOW-RS to this service root (e.g. http://pacs:8042/dicom-web).")] = None,
    dicomweb_port: Annotated[Optional[int], typer.Option(
        help="Also take films by DICOMweb STOW-RS (POST /studies) on this port, same host.")] = None,
    allow: Annotated[Optional[list[str]], typer.Option(
        help="Calling AE title, or IP address or network (10.1.2.0/24), allowed to send (repeat); any if omitted. "
             "Addresses bind both doors; with AE titles alone the STOW-RS door takes requests from this machine only.")] = None,
    queue: Annotated[int, typer.Option(
        min=1, help="Instances waiting (to be processed or forwarded) at most; more are answered 'out of resources'.")] = 64,
    tries: Annotated[int, typer.Option(
        min=1, help="Tries of an instance whose processing fails before it goes to OUT/failed.")] = 3,
    idle_timeout: Annotated[float, typer.Option(
        min=1, help="Seconds an association may stay silent before it is closed (idle peers must not hold the "
                    "slots senders need).")] = 20.0,
    max_associations: Annotated[int, typer.Option(
        min=1, help="Associations open at once; more are rejected (transient, 'local limit exceeded').")] = 10,
    max_instance_mb: Annotated[float, typer.Option(
        min=0, help="An instance larger than this (MiB) ends its association while it arrives (0: the file "
                    "limit, about 260 MiB).")] = 0.0,
    failed_max: Annotated[int, typer.Option(
        min=1, help="Instances kept in OUT/failed at most; the oldest are removed (logged).")] = 1000,
    failed_max_mb: Annotated[float, typer.Option(
        min=1, help="MiB kept in OUT/failed at most; the oldest are removed (logged).")] = 1024.0,
    seg_model: Annotated[Optional[Path], typer.Option(help="Lung model file (default: shipped).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Classifier file (default: shipped).")] = None,
    backend: BackendOption = "auto",
    db: DbOption = None,
    keep_films: Annotated[Optional[Path], typer.Option(
        help="With --db: keep each received film here (named by its SHA-256), so reviewed films can be exported.")] = None,
) -> None:
    """DICOM listener: chest X-rays (CR, DX, Secondary Capture) in by C-STORE (or STOW-RS), SR +
    SEG + Secondary Capture out (and forwarded with --forward / --forward-dicomweb). Received
    instances are spooled to disk first, so a crash loses nothing; C-ECHO answers for monitoring.
    No TLS: keep it behind the hospital's DICOM router or a VPN. Research use only."""
    need_extra("dicom", "listen", "pynetdicom", "highdicom")
    from pneumoscan.apps.listen import Listener

    if not 1 <= len(ae_title) <= 16:
        fail("--ae-title must be 1 to 16 characters")
    if not (host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")):
        err.print(f"[yellow]warning:[/] listening on {host} beyond this machine: the DICOM port has no TLS and "
                  f"no authentication beyond {'the --allow list' if allow else 'nothing (no --allow given)'}"
                  f"{' and the STOW-RS door none at all' if dicomweb_port is not None and not allow else ''}; keep it behind the "
                  f"hospital's DICOM router or a VPN", highlight=False)
    targets = forward_targets(forward, forward_dicomweb)
    if dicomweb_port is not None:
        need_extra("web", "--dicomweb-port", "uvicorn", "starlette")
    ensure_writable(out, "--out")
    store = store_and_kept_films(db, keep_films)
    predictor = load_predictor(seg_model, model, backend=backend, device="cpu", allow_model_mismatch=False)
    listener = Listener(predictor, out, spool or out / ".spool", ae_title=ae_title, port=port, host=host,
                        forward=tuple(targets), allow=tuple(allow or ()), queue_size=queue, tries=tries,
                        store=store, keep_films=keep_films, idle_timeout=idle_timeout,
                        max_associations=max_associations, failed_max=failed_max,
                        max_instance_bytes=int(max_instance_mb * 2**20),
                        failed_max_bytes=int(failed_max_mb * 2**20))
    console.print(f"PneumoScan DICOM listener {ae_title} on {host}:{port}"
                  + (f" (STOW-RS on http://{host}:{dicomweb_port}/studies)" if dicomweb_port is not None else "")
                  + f"; results in {out}" + (f" and {store.where}" if store else "")
                  + "".join(f", forwarded to {target}" for target in targets), highlight=False)
    try:
        listener.serve_forever(stow_port=dicomweb_port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        listener.stop()
