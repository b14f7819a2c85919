"""The results store's reads and writes of results, readers and reviews (where the database is
and its schema's revision: :mod:`pneumoscan.store.database`). Every failure is a :class:`StoreError` that says what to
do, never a driver's traceback; the URL's password never appears in a message."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, overload

from sqlalchemy import exists, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from pneumoscan.errors import PneumoScanError, first_line
from pneumoscan.store.database import (
    StoreError,
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    migrate,
    shown,
    store_url,
)
from pneumoscan.store.records import FilmIdentity, LayerData, aware, key_digest, models_key, now
from pneumoscan.store.schema import (
    Film,
    Layers,
    Reader,
    Result,
    Review,
    StoreMeta,
    Verdict,
)

#: How often a write that lost a race (two films or reviews inserted at once) is tried again.
RETRIES = 5
#: A reader's verdict on one of the model's calls (not the film's verdict, :data:`pneumoscan.reading.VERDICTS`).
class ReviewVerdict(StrEnum):
    """A reader's verdict on one of the model's calls."""

    AGREE = "agree"
    DISAGREE = "disagree"
    UNSURE = "unsure"


REVIEW_VERDICTS = tuple(ReviewVerdict)


class SubmissionTaken(PneumoScanError, ValueError):
    """A review's submission id that belongs to another reader's or result's review."""


class NotFound(StoreError):
    """No such result."""


class Store:
    """One database. Opening an empty one creates the schema (Alembic ``upgrade head``); one at
    another revision is refused with the command that migrates it."""

    def __init__(self, url: str | None = None, *, create: bool = True):
        #: films in a row this store failed to take, the last reason and when (the writer rests a store
        #: that keeps failing: pneumoscan.outputs.writer.write_to_store)
        self.failing: tuple[int, str, float] = (0, "", 0.0)
        self.url = store_url(url)
        database = make_url(self.url).database if self.url.startswith("sqlite") else None
        if not create and database and database != ":memory:" and not Path(database).exists():
            # connecting would make an empty file: a mistyped --db must not read as "no reviews yet"
            raise StoreError(f"no results store at {database}: give the --db that predict, serve or listen wrote to")
        self.engine = make_engine(self.url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self._check_schema(create)
            self.salt = self._salt()
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise StoreError(f"results store {shown(self.url)} cannot be used: {first_line(exc)}") from None
        except StoreError:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def reachable(self) -> bool:
        """Whether the database answers now (``/health`` says so; a store that went down is not "ok")."""
        try:
            with self.engine.connect() as connection:
                connection.execute(select(1))
            return True
        except SQLAlchemyError:
            return False

    def __enter__(self) -> Store:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def where(self) -> str:
        return shown(self.url)

    def _check_schema(self, create: bool) -> None:
        head, current = head_revision(), current_revision(self.engine)
        if current == head:
            return
        if current is None and set(inspect(self.engine).get_table_names()) <= {"alembic_version"} and create:
            migrate(self.url)
            return
        if current is None:
            raise StoreError(f"{self.where} is not a PneumoScan results store (it has other tables, or none and "
                             f"creating was not allowed); give another --db")
        from alembic.script import ScriptDirectory

        known = {s.revision for s in ScriptDirectory.from_config(alembic_config(self.url)).walk_revisions()}
        if current in known:
            raise StoreError(f"{self.where} has schema revision {current}; this PneumoScan needs {head}: "
                             f"run `pneumoscan review migrate --db URL` first")
        raise StoreError(f"{self.where} has schema revision {current}, made by a newer PneumoScan (this one "
                         f"knows up to {head}); upgrade PneumoScan")

    def _salt(self) -> str:
        for _ in range(RETRIES):
            with self.sessions() as session:
                row = session.get(StoreMeta, "patient_salt")
                if row is not None:
                    return row.value
                session.add(StoreMeta(key="patient_salt", value=secrets.token_hex(16)))
                try:
                    session.commit()
                except IntegrityError:
                    continue  # another process made it first
        raise StoreError(f"{self.where}: could not read or make the store's salt")

    @contextmanager
    def session(self, what: str) -> Iterator[Session]:
        """A transaction; any database failure is a :class:`StoreError` naming ``what``."""
        try:
            with self.sessions() as session, session.begin():
                yield session
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StoreError(f"results store {self.where}: {what} failed: {first_line(exc)}") from None

    # --- results -------------------------------------------------------------------------

    def patient_key(self, patient_id: str | None) -> str | None:
        if not patient_id:
            return None
        return hashlib.sha256(f"{self.salt}:{patient_id}".encode()).hexdigest()[:32]

    def add_result(self, record: dict[str, Any], film: FilmIdentity, run: dict[str, Any], source: str,
                   layers: LayerData | None = None) -> int:
        """Store one result (its film, once); the same film and ``run`` again updates that row
        (its id is kept, and with it its reviews). Returns the result's id."""
        key, moment = models_key(run), now()
        for attempt in range(RETRIES):
            try:
                with self.session(f"storing {film.display_name}") as session:
                    row = session.scalar(select(Film).where(Film.sha256 == film.sha256))
                    if row is None:
                        row = Film(sha256=film.sha256, display_name=film.display_name[:255], path=film.path,
                                   study_uid=film.study_uid, series_uid=film.series_uid, sop_uid=film.sop_uid,
                                   patient_key=self.patient_key(film.patient_id), created_at=moment)
                        session.add(row)
                        session.flush()
                    elif film.path and not row.path:
                        row.path = film.path
                    result = session.scalar(select(Result).where(Result.film_id == row.id, Result.models_key == key))
                    if result is None:
                        result = Result(film_id=row.id, models_key=key, created_at=moment)
                        session.add(result)
                    self._fill(result, record, run, source, moment)
                    session.flush()
                    if layers is not None:
                        session.merge(Layers(result_id=result.id, **layers.__dict__))
                    return result.id
            except IntegrityError:
                if attempt == RETRIES - 1:
                    raise StoreError(f"results store {self.where}: storing {film.display_name} kept "
                                     f"colliding with other writers") from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _fill(result: Result, record: dict[str, Any], run: dict[str, Any], source: str, moment: datetime) -> None:
        from pneumoscan.reading import status_of

        result.models = run
        result.source = source[:32]
        result.status = status_of(record)
        result.verdict = record.get("verdict")
        result.population = (record.get("population") or {}).get("group")
        result.findings = "|" + "".join(f"{f}|" for f in record.get("findings") or [])
        result.probabilities = record.get("probabilities")
        result.thresholds = record.get("thresholds")
        result.thresholds_from = record.get("thresholds_from")
        result.calibrated_for = record.get("calibrated_for")
        result.record = record
        result.overlay = record.get("overlay")
        result.updated_at = moment

    def worklist(self, reader_id: int | None, *, status: str | None = None, finding: str | None = None,
                 source: str | None = None, since: datetime | None = None, until: datetime | None = None,
                 reviewed_by: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Results this reader has not reviewed first (then the newest), filtered; and the total."""
        mine = exists().where(Review.result_id == Result.id, Review.reader_id == (reader_id or -1))
        reviews = select(func.count(Review.id.distinct())).where(Review.result_id == Result.id).scalar_subquery()
        readers = (select(func.count(Review.reader_id.distinct())).where(Review.result_id == Result.id)
                   .scalar_subquery())
        query = select(Result, Film, mine.label("mine"), readers.label("readers"), reviews.label("reviews")) \
            .join(Film, Film.id == Result.film_id)
        if status:
            query = query.where(Result.status == status)
        if finding:
            query = query.where(Result.findings.contains(f"|{finding}|", autoescape=True))
        if source:
            query = query.where(Result.source == source)
        if since:
            query = query.where(Result.created_at >= since)
        if until:
            query = query.where(Result.created_at < until)
        if reviewed_by:
            query = query.where(exists().where(Review.result_id == Result.id, Review.reader_id == Reader.id,
                                               func.lower(Reader.name).contains(reviewed_by.lower(), autoescape=True)))
        with self.session("reading the worklist") as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.execute(query.order_by(mine.asc(), Result.created_at.desc(), Result.id.desc())
                                   .limit(limit).offset(offset)).all()
        return [{"id": r.id, "name": f.display_name, "status": r.status, "verdict": r.verdict,
                 "findings": [x for x in r.findings.split("|") if x], "source": r.source,
                 "created_at": aware(r.created_at).isoformat(), "reviewed_by_me": bool(m), "readers": n,
                 "reviews": k} for r, f, m, n, k in rows], total

    def result_view(self, result_id: int, reader_id: int | None) -> dict[str, Any]:
        """A result as the review page shows it: the record, the layers and this reader's current review."""
        with self.session("reading a result") as session:
            result = session.get(Result, result_id)
            if result is None:
                raise NotFound(f"no result {result_id}")
            layers = session.get(Layers, result_id)
            mine = session.scalar(select(Review).options(selectinload(Review.verdicts))
                                  .where(Review.result_id == result_id, Review.reader_id == (reader_id or -1))
                                  .order_by(Review.seq.desc()).limit(1))
            film = result.film
            record = dict(result.record)
        return {"id": result.id, "name": film.display_name, "sha256": film.sha256, "study_uid": film.study_uid,
                "sop_uid": film.sop_uid, "source": result.source, "models": result.models,
                "created_at": aware(result.created_at).isoformat(), "record": record,
                "layers": None if layers is None else {
                    "preview": layers.preview, "width": layers.width, "height": layers.height, "scale": layers.scale,
                    "lungs": layers.lungs, "heart": layers.heart, "heat": layers.heat},
                "my_review": None if mine is None else review_dict(mine)}

    # --- readers ---------------------------------------------------------------------------

    def add_reader(self, name: str, *, adjudicator: bool = False) -> str:
        """A new reader and their key (shown once; the store keeps only its SHA-256)."""
        name = check_reader_name(name)
        key = secrets.token_urlsafe(24)
        try:
            with self.session(f"adding reader {name}") as session:
                session.add(Reader(name=name, key_sha256=key_digest(key), adjudicator=adjudicator, created_at=now()))
        except IntegrityError:
            raise StoreError(f"a reader named {name!r} exists already") from None
        return key

    def reader_by_key(self, key: str) -> Reader | None:
        with self.session("checking a reader key") as session:
            return session.scalar(select(Reader).where(Reader.key_sha256 == key_digest(key)))

    @overload
    def reader_by_name(self, name: str, *, create: Literal[True]) -> Reader: ...

    @overload
    def reader_by_name(self, name: str, *, create: bool = False) -> Reader | None: ...

    def reader_by_name(self, name: str, *, create: bool = False) -> Reader | None:
        """A reader named by the site's proxy header (made on first sight when ``create``)."""
        name = check_reader_name(name)
        for _ in range(RETRIES):
            try:
                with self.session("finding a reader") as session:
                    reader = session.scalar(select(Reader).where(Reader.name == name))
                    if reader is None and create:
                        reader = Reader(name=name, key_sha256=None, adjudicator=False, created_at=now())
                        session.add(reader)
                    return reader
            except IntegrityError:
                continue
        raise StoreError(f"could not add reader {name!r}")

    def readers(self) -> list[dict[str, Any]]:
        with self.session("listing readers") as session:
            rows = session.execute(select(Reader, func.count(Review.id)).outerjoin(Review, Review.reader_id == Reader.id)
                                   .group_by(Reader.id).order_by(Reader.name)).all()
        return [{"name": r.name, "adjudicator": r.adjudicator, "key": r.key_sha256 is not None, "reviews": n,
                 "created_at": aware(r.created_at).isoformat()} for r, n in rows]

    # --- reviews -----------------------------------------------------------------------------

    def add_review(self, result_id: int, reader: Reader, review: dict[str, Any]) -> dict[str, Any]:
        """Append a checked review (:func:`pneumoscan.store.review.check_review`): it supersedes
        this reader's earlier one of the same result. A ``submission`` id sent twice by the same
        reader for the same result (a client's retry) is stored once; the same id for another
        reader or result is refused (:class:`SubmissionTaken`)."""
        for _ in range(RETRIES):
            try:
                with self.session("storing a review") as session:
                    if review.get("submission"):
                        before = session.scalar(select(Review).options(selectinload(Review.verdicts))
                                                .where(Review.submission == review["submission"]))
                        if before is not None and (before.reader_id, before.result_id) != (reader.id, result_id):
                            # another reader's (or result's) id: never answer with their review
                            raise SubmissionTaken("this submission id was used for another review; send the review "
                                                  "with a new id")
                        if before is not None:
                            return review_dict(before) | {"repeated": True}
                    seq = (session.scalar(select(func.coalesce(func.max(Review.seq), 0))
                                          .where(Review.result_id == result_id, Review.reader_id == reader.id))
                           or 0) + 1
                    row = Review(result_id=result_id, reader_id=reader.id, seq=seq, submission=review.get("submission"),
                                 labels=review["labels"], box=review.get("box"), note=review.get("note"),
                                 seconds=review.get("seconds"), created_at=now())
                    row.verdicts = [Verdict(label=label, verdict=v) for label, v in sorted(review["verdicts"].items())]
                    session.add(row)
                    session.flush()
                    return review_dict(row) | {"repeated": False}
            except IntegrityError:
                continue  # the same reader's other submission took this seq: count again
        raise StoreError("the review collided with others too often; send it again")

    def result_for_review(self, result_id: int) -> dict[str, Any]:
        with self.session("reading a result") as session:
            result = session.get(Result, result_id)
            if result is None:
                raise NotFound(f"no result {result_id}")
            return dict(result.record)

    def review_rows(self) -> list[dict[str, Any]]:
        """Every review (superseded ones too, flagged), with its result's calls and its film."""
        with self.session("reading reviews") as session:
            rows = session.execute(
                select(Review, Reader, Result, Film).join(Reader, Reader.id == Review.reader_id)
                .join(Result, Result.id == Review.result_id).join(Film, Film.id == Result.film_id)
                .options(selectinload(Review.verdicts)).order_by(Review.id)).all()
            out = []
            for review, reader, result, film in rows:
                out.append(review_dict(review) | {
                    "reader": reader.name, "adjudicator": reader.adjudicator, "result_id": result.id,
                    "models_key": result.models_key, "film_id": film.id, "sha256": film.sha256, "path": film.path,
                    "display_name": film.display_name, "study_uid": film.study_uid, "sop_uid": film.sop_uid,
                    "patient_key": film.patient_key, "record": result.record})
        latest: dict[tuple, int] = {}
        for row in out:
            latest[(row["result_id"], row["reader"])] = row["seq"]
        for row in out:
            row["current"] = latest[(row["result_id"], row["reader"])] == row["seq"]
        return out

    def each_result(self, batch: int = 1000):
        """Every result in stored order as (id, created_at, source, record), read ``batch`` rows at
        a time (a site's monitor reads 100,000 of them without holding them all)."""
        with self.session("reading results in stored order") as session:
            query = select(Result.id, Result.created_at, Result.source, Result.record).order_by(Result.id)
            for row in session.execute(query.execution_options(yield_per=batch)):
                yield row.id, aware(row.created_at), row.source, row.record

    def counts(self) -> dict[str, int]:
        with self.session("counting") as session:
            return {name: session.scalar(select(func.count()).select_from(table)) or 0 for name, table in
                    (("films", Film), ("results", Result), ("readers", Reader), ("reviews", Review),
                     ("verdicts", Verdict))}


def check_reader_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise StoreError("a reader's name is 1 to 64 printable characters")
    return name


def review_dict(review: Review) -> dict[str, Any]:
    return {"id": review.id, "seq": review.seq, "labels": list(review.labels), "box": review.box,
            "note": review.note, "seconds": review.seconds, "created_at": aware(review.created_at).isoformat(),
            "verdicts": {v.label: v.verdict for v in review.verdicts}, "submission": review.submission}
