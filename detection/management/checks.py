"""Checks shared by the management commands."""
import functools

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, OperationalError, ProgrammingError, connections
from django.db.migrations.executor import MigrationExecutor


def require_migrated(database: str = DEFAULT_DB_ALIAS) -> None:
    """Raise CommandError when the database has unapplied migrations."""
    executor = MigrationExecutor(connections[database])
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        raise CommandError(f"the database has {len(pending)} unapplied migration(s); "
                           "run `python manage.py migrate` first")


def migrated_database(handle):
    """Decorate a command's handle(): a database error that comes from missing migrations (a fresh
    checkout that skipped `migrate`: "no such table") becomes a CommandError saying so, instead of a
    traceback. Other database errors propagate unchanged. Costs nothing when all is well."""
    @functools.wraps(handle)
    def wrapper(self, *args, **options):
        try:
            return handle(self, *args, **options)
        except (OperationalError, ProgrammingError):
            require_migrated()
            raise
    return wrapper


def fleet_named(name: str):
    """The fleet called `name`; a CommandError listing the known fleets when there is none."""
    from detection.models import Fleet

    try:
        return Fleet.objects.get(name=name)
    except Fleet.DoesNotExist:
        known = ", ".join(Fleet.objects.values_list("name", flat=True)) or "none yet"
        raise CommandError(f"unknown fleet {name!r} (known: {known})") from None
