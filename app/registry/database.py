"""Engine, sessions and migrations of the registry database."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, Executable, Select, create_engine, event
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
RowT = TypeVar("RowT")


def create_registry_engine(url: str) -> Engine:
    """An engine tuned for the backend: SQLite gets WAL and a busy timeout, because the
    gateway and the workers write the same file from different processes."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # a database that stops answering fails a connection in seconds, not at the TCP timeout
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises."""
    with sessions() as session, session.begin():
        yield session


def migrate(url: str) -> None:
    """Bring the database at `url` to the newest schema (Alembic `upgrade head`)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    engine = create_registry_engine(url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def keyset_page(
    session: Session, query: Select[RowT], id_column: InstrumentedAttribute[str], cursor: str | None, limit: int
) -> tuple[list[RowT], str | None]:
    """Newest first by id (ids sort by creation time); `cursor` is the last id of the
    previous page, and the returned cursor is None on the last page."""
    query = query.order_by(id_column.desc()).limit(limit + 1)
    if cursor:
        query = query.where(id_column < cursor)
    rows = list(session.scalars(query))
    next_cursor = getattr(rows[limit - 1], id_column.key) if len(rows) > limit else None
    return rows[:limit], next_cursor


def changed_rows(session: Session, statement: Executable) -> int:
    """How many rows an UPDATE or DELETE changed: the answer of a compare-and-set."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount
