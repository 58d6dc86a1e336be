"""Alembic environment: migrations run on the connection the node hands over."""

import warnings

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlalchemy.exc import SAWarning

from node.index.models import Base

config = context.config
target_metadata = Base.metadata

# A batch migration on SQLite reflects the table it rebuilds and the tables its foreign keys lead to,
# among them patient with its expression index (lower(patient_name)), which SQLAlchemy cannot reflect and
# says so on stderr at every upgrade. The index is not rebuilt by any batch (it is on patient), so the
# warning is noise in the node's log; nothing else is silenced.
warnings.filterwarnings(
    "ignore", message="Skipped unsupported reflection of expression-based index", category=SAWarning
)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("no database to migrate: hand over a connection or set sqlalchemy.url")
        engine = create_engine(url)
        with engine.begin() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
