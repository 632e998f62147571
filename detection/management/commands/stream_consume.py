"""python manage.py stream_consume --fleet NAME: score the fleet's live Redis stream (detection.ingest.stream).

Start several (with different --consumer names) to share one stream: they form one consumer group.
SIGINT/SIGTERM finish the current micro-batch, then exit.
"""
import gc
import os
import signal
import socket

from django.core.management.base import BaseCommand, CommandError

from detection.ingest.stream import StreamConsumerError, dead_letter_key, stream_consume, stream_key


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        import argparse

        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


class Command(BaseCommand):
    help = "Consume a fleet's Redis stream of telemetry events, score them in micro-batches and persist the results."

    def add_arguments(self, parser):
        parser.add_argument("--fleet", required=True, help="fleet name; the stream is vigil:telemetry:<fleet>")
        parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}",
                            help="consumer name in the group (default host-pid); reuse it after a restart "
                                 "to pick up this consumer's pending entries at once")
        parser.add_argument("--batch", type=_positive, default=500, help="max events per micro-batch (500)")
        parser.add_argument("--block-ms", type=_non_negative, default=1000,
                            help="how long one read waits for new events, ms (1000)")
        parser.add_argument("--max-events", type=_positive, help="exit after handling this many events")
        parser.add_argument("--reclaim-idle-ms", type=_non_negative, default=60_000,
                            help="claim other consumers' entries pending longer than this, ms (60000)")
        parser.add_argument("--exit-when-idle", action="store_true", help="exit when a read finds nothing")
        parser.add_argument("--metrics-port", type=_positive,
                            help="serve this process's Prometheus metrics on this port")

    def handle(self, *args, **opts):
        stopping = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.append(True))
        if opts["metrics_port"]:
            from prometheus_client import start_http_server

            start_http_server(opts["metrics_port"])
        fleet = opts["fleet"]
        self.stdout.write(f"consuming {stream_key(fleet)} as {opts['consumer']} "
                          f"(dead letters: {dead_letter_key(fleet)})")
        # What the process holds before consuming (modules, Django, the libraries) lives as long as it
        # does: frozen, the collector stops walking it after every micro-batch of short-lived objects.
        gc.collect()
        gc.freeze()
        try:
            stats = stream_consume(fleet_name=fleet, consumer=opts["consumer"], batch=opts["batch"],
                                   block_ms=opts["block_ms"], max_events=opts["max_events"],
                                   reclaim_idle_ms=opts["reclaim_idle_ms"], idle_exit=opts["exit_when_idle"],
                                   stop=lambda: bool(stopping))
        except StreamConsumerError as exc:
            raise CommandError(str(exc)) from None
        finally:
            gc.unfreeze()
        self.stdout.write(self.style.SUCCESS(
            f"read {stats.read}, scored {stats.scored} ({stats.anomalies} anomalies), duplicates {stats.duplicates}, "
            f"dead-lettered {stats.dead_lettered}, reclaimed {stats.reclaimed}, batches {stats.batches} "
            f"({stats.failed_batches} failed)"))
