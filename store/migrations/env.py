"""Alembic environment: runs the store's migrations on the connection that ``store.database`` hands over."""

from alembic import context

from store.models import Base

target_metadata = Base.metadata


def run_migrations():
    """Online migrations only: the caller passes an open connection in ``config.attributes["connection"]``."""
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
