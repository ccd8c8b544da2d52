"""Alembic environment: migrations run on SQLite and Postgres from the same scripts."""

from alembic import context

from service.core.db import make_engine
from service.core.orm import Base
from service.core.settings import get_settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url()


def run_migrations() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER columns
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
