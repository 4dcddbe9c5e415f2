"""Alembic environment: runs on the connection the store hands over (SQLite or PostgreSQL)."""

from alembic import context

from slm_annotator.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
