"""Where the results store is and what shape its schema is in: the URL (a SQLite file by default,
or PostgreSQL), the engine (SQLite in WAL mode; PostgreSQL pooled with pre-ping), and the schema's
Alembic revision, migrated up or down. A URL's password never appears in a message."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from pneumoscan.errors import PneumoScanError, first_line


class StoreError(PneumoScanError, RuntimeError):
    """The store cannot be reached, has another schema revision, or refused a write."""


def default_path() -> Path:
    """``$XDG_DATA_HOME/pneumoscan/results.sqlite`` (``~/.local/share/…`` when unset)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "pneumoscan" / "results.sqlite"


def store_url(given: str | None = None) -> str:
    """The database URL: ``given`` (a URL, or a path to a SQLite file), else ``$PNEUMOSCAN_DB``,
    else :func:`default_path`. ``postgresql://`` means the psycopg 3 driver."""
    value = given or os.environ.get("PNEUMOSCAN_DB") or str(default_path())
    if "://" not in value:
        return "sqlite:///" + str(Path(value).expanduser().resolve())
    if value.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    return value


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("pneumoscan.store") / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:  # only a broken install ships no migration
        raise RuntimeError("the results store's migrations are missing from this install (reinstall pneumoscan)")
    return head


def migrate(url: str, to: str = "head", *, down: bool = False) -> str | None:
    """Upgrade (or with ``down`` downgrade) the schema to revision ``to`` ("head", "base" or an
    id); returns the revision it is at afterwards."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, to)
        return current_revision(engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"results store {shown(url)}: migration failed: {first_line(exc)}") from None
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _sqlite_pragmas(connection, _record) -> None:
    """WAL (readers never wait for the writer), foreign keys on, and a writer waits up to 30 s for
    another instead of failing at once."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"not a database URL or path: {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4,
                             connect_args={"connect_timeout": 10})
    except (ArgumentError, ImportError) as exc:
        raise StoreError(f"results store {shown(url)}: {first_line(exc)}") from None
