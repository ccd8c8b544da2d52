"""Engine, sessions, and the session factory requests use.

SQLite gets WAL and foreign keys; Postgres works as configured. Requests open sessions off the
event loop (in plain `def` handlers and dependencies, which run in the thread pool) and close them
before any long wait, such as an upload body or an event stream: a request holds a pooled
connection only while it reads or writes.
"""

from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from service.core.settings import get_settings


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def ping(engine: Engine) -> None:
    """One round trip to the database; raises what the driver raises when it cannot."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url())


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


async def session_factory(request: Request) -> sessionmaker[Session]:
    """The session factory the app was given (`create_app(sessions=...)`; tests bind one to
    their transaction), else the configured one. Async: it only returns an object, and a sync
    dependency would cost a thread hop."""
    sessions: sessionmaker[Session] | None = request.app.state.sessions
    return sessions if sessions is not None else get_sessionmaker()


# A handler opens, uses and closes its session in one call on the thread pool
# (`with sessions() as session:` inside a plain `def`), never across two: a connection taken in
# one thread hop and given back in another lets threads waiting for the pool take every thread
# token while the sessions that hold connections wait for one to close — a deadlock.
SessionsDep = Annotated[sessionmaker[Session], Depends(session_factory)]
