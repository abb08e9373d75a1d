"""Alembic's env.py for an application on ormkit (sync engines).

Copy it over the `env.py` that `alembic init migrations` wrote. Migrations then run on an engine
made by `ormkit.create_engine`, with the same defaults as the application: on SQLite, foreign
keys enforced, real transactions (so a failed migration rolls back, DDL included) and a busy
timeout; on PostgreSQL, the URL checked the same way.
"""

from __future__ import annotations

from alembic import context

import ormkit

config = context.config
# Your models' metadata, for `alembic revision --autogenerate`: in an application,
# `from myapp.models import Base` and `Base.metadata`. Code that runs Alembic itself (as the
# docs page does) may hand it over in `config.attributes` instead.
target_metadata = config.attributes.get("target_metadata")


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: write the SQL out, connect to nothing."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a connection of an ormkit engine, in one transaction."""
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("set sqlalchemy.url in alembic.ini (or on the Config)")
    engine = ormkit.create_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
