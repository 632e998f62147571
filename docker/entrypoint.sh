#!/bin/sh
# Web container: apply migrations and collect static files, then run the command (daphne by default).
# Workers and beat set VIGIL_SKIP_SETUP=1: the web container owns migrations.
set -eu
if [ "${VIGIL_SKIP_SETUP:-0}" != "1" ]; then
    python manage.py migrate --noinput
    python manage.py collectstatic --noinput
fi
exec "$@"
