"""Alembic environment: runs the migrations on the connection it is given.

`models.schema.upgrade` passes a connection that is already inside its locked, all-or-nothing
transaction, so ``begin_transaction`` below joins it and every migration commits or rolls back
together.  (A URL is used only when alembic is run by hand with ``sqlalchemy.url`` set.)
"""

from alembic import context
from sqlalchemy import create_engine

from models.schema import load_all_tables

config = context.config
target_metadata = load_all_tables()


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
