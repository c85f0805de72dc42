"""The long-running processes: ``t2iroute worker``, ``beat``, ``flower`` and ``api``, and
``worker-health``, a worker's liveness check. Each imports the Celery app (or the HTTP app)
when it runs, not before."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from workers.entrypoints.cli.output import console, quiet_pipeline_loading
from workers.settings import Settings, get_settings


def worker(
    queues: Annotated[
        str,
        typer.Option(
            help="Comma-separated queues by role: route, quality, maintenance, callbacks, a tier."
        ),
    ] = "",
    tiers: Annotated[
        str, typer.Option(help="Comma-separated tiers of the pool whose generations to run.")
    ] = "",
    pool: Annotated[
        str,
        typer.Option(
            help="Celery pool; GPU queues want solo, the callbacks queue threads "
            "(each send mostly waits on its receiver)."
        ),
    ] = "prefork",
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    loglevel: Annotated[str, typer.Option()] = "INFO",
    hostname: Annotated[str | None, typer.Option()] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve the worker's Prometheus metrics on this port "
            "[default: T2IROUTE_METRICS_PORT; unset, none].",
        ),
    ] = None,
) -> None:
    """Run a Celery worker on the given queues (a thin wrapper of `celery worker`)."""
    settings = get_settings()
    port = metrics_port or settings.metrics_port
    if port is not None:
        # Before anything imports prometheus-client, which picks its mode then.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_folder(settings.metrics_dir))
    from workers.app.celery_app import app as celery_app
    from workers.app.celery_app import prefetch_multiplier
    from workers.pool import PoolError

    names = [settings.queues.get(q.strip(), q.strip()) for q in queues.split(",") if q.strip()]
    if tiers:
        try:
            names += [tier.queue_name for tier in settings.pool.select(tiers)]
        except PoolError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    if not queues and not tiers:
        names = list(settings.queues.values())
    _refuse_missing_models(settings, names)
    quiet_pipeline_loading()
    argv = [
        "worker",
        f"--queues={','.join(names)}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        f"--prefetch-multiplier={prefetch_multiplier(settings, names)}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if settings.broker_url.startswith("filesystem"):
        # A filesystem broker has no fanout exchange for worker-to-worker chatter.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    if port is not None:
        from workers.services.telemetry import serve_worker_metrics

        try:
            serve_worker_metrics(port, settings.metrics_host)
        except OSError as exc:
            typer.echo(f"t2iroute worker: cannot serve metrics on port {port}: {exc}", err=True)
            raise typer.Exit(2) from None
    celery_app.worker_main(argv)


def _metrics_folder(configured: Path | None) -> Path:
    """The folder this worker's processes keep their metric values in
    (workers/services/telemetry.py):
    the configured one, emptied (the pids of an earlier run may come back), or a fresh
    temporary one, removed when the worker exits."""
    if configured is None:
        folder = Path(tempfile.mkdtemp(prefix="t2iroute-metrics-"))
        owner = os.getpid()

        def remove() -> None:
            # Only the main process: a pool process that runs exit handlers must not.
            if os.getpid() == owner:
                shutil.rmtree(folder, ignore_errors=True)

        atexit.register(remove)
        return folder
    configured.mkdir(parents=True, exist_ok=True)
    for stale in configured.glob("*.db"):
        stale.unlink()
    return configured


def _refuse_missing_models(settings: Settings, queues: list[str]) -> None:
    """Stop a worker whose models are not there, with the reason, before it takes a message:
    otherwise it would start and fail every request sent to it."""
    from workers.services.runtime import missing_models

    missing = missing_models(settings, queues)
    if not missing:
        return
    typer.echo("t2iroute worker: cannot start, a model it loads is missing:", err=True)
    for model in missing:
        typer.echo(
            f"  {model.user}: no {model.marker} in {model.path} (set by {model.setting})",
            err=True,
        )
    typer.echo(
        "Build tiny models with `t2iroute pipelines make-tiny` (into T2IROUTE_HOME/var/models, "
        "where the default settings look), or point the setting at a model folder or a hub id.",
        err=True,
    )
    raise typer.Exit(2)


def worker_health(
    hostname: Annotated[
        str | None,
        typer.Option(help="The worker's --hostname, e.g. edge@%h; default celery@%h."),
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for a ping.")] = 10.0,
) -> None:
    """Exit 0 if the worker on this host answers a ping, or is inside one task that is
    still within the task time limit; exit 1 otherwise (a liveness check)."""
    from workers.app.celery_app import app as celery_app
    from workers.app.liveness import check_worker, node_name

    health = check_worker(
        celery_app,
        node_name(hostname),
        timeout=timeout,
        time_limit=get_settings().task_time_limit,
    )
    typer.echo(f"{health.node}: {health.reason}")
    if not health.alive:
        raise typer.Exit(1)


def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run the periodic scheduler (sweeper and retraining)."""
    from workers.app.celery_app import app as celery_app

    celery_app.start(["beat", f"--loglevel={loglevel}"])


def flower(
    address: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 5555,
) -> None:
    """Run Flower on every queue, through Celery events. Its API can start any registered
    task, so off the loopback interface it refuses to run without basic auth."""
    from workers.app.celery_app import app as celery_app

    auth = get_settings().flower_basic_auth
    if auth is None and address not in ("127.0.0.1", "::1", "localhost"):
        console.print("[red]set T2IROUTE_FLOWER_BASIC_AUTH=user:password to listen there[/red]")
        raise typer.Exit(2)
    argv = ["flower", f"--address={address}", f"--port={port}"]
    if auth is not None:
        argv.append(f"--basic-auth={auth}")
    celery_app.start(argv)


def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Serve the HTTP API (FastAPI) with Prometheus metrics. Off loopback it requires API
    keys (`t2iroute keys create`) unless T2IROUTE_API_AUTH=off."""
    from workers.entrypoints.http.app import serve

    serve(host, port)
