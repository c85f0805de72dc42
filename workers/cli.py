"""The ``t2iroute`` command line (typer). Each command is a thin wrapper over a function
in workers/ or routing/; heavy imports happen inside the commands that need them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from workers.eval_cli import eval_app
from workers.settings import get_settings

app = typer.Typer(help="Edge-cloud routing for text-to-image generation.", no_args_is_help=True)
models_app = typer.Typer(help="Model artefacts.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")
console = Console()


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _quiet_model_libraries() -> None:
    """Model libraries' notices and progress bars, which would bury a command's own output;
    set before they are imported, and inherited by the worker processes a command starts."""
    for variable, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ):
        os.environ.setdefault(variable, value)


@app.command()
def migrate(
    check: Annotated[
        bool, typer.Option(help="Only check that models and migrations agree.")
    ] = False,
) -> None:
    """Upgrade the database to the newest schema (alembic upgrade head)."""
    from db import migrate as db_migrate

    url = get_settings().database_url
    db_migrate.upgrade(url)
    if check:
        db_migrate.check(url)
    console.print("[green]database is at the newest revision[/green]")


@app.command()
def worker(
    queues: Annotated[
        str,
        typer.Option(help="Comma-separated queues by role: route, quality, maintenance, a tier."),
    ] = "",
    tiers: Annotated[
        str, typer.Option(help="Comma-separated tiers of the pool whose generations to run.")
    ] = "",
    pool: Annotated[str, typer.Option(help="Celery pool; GPU queues want solo.")] = "prefork",
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    loglevel: Annotated[str, typer.Option()] = "INFO",
    hostname: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Run a Celery worker on the given queues (a thin wrapper of `celery worker`)."""
    from workers.celery_app import app as celery_app
    from workers.celery_app import prefetch_multiplier
    from workers.pool import PoolError

    settings = get_settings()
    names = [settings.queues.get(q.strip(), q.strip()) for q in queues.split(",") if q.strip()]
    if tiers:
        try:
            names += [tier.queue_name for tier in settings.pool.select(tiers)]
        except PoolError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    if not queues and not tiers:
        names = list(settings.queues.values())
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
    celery_app.worker_main(argv)


@app.command("worker-health")
def worker_health(
    hostname: Annotated[
        str | None,
        typer.Option(help="The worker's --hostname, e.g. edge@%h; default celery@%h."),
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for a ping.")] = 10.0,
) -> None:
    """Exit 0 if the worker on this host answers a ping, or is inside one task that is
    still within the task time limit; exit 1 otherwise (a liveness check)."""
    from workers.celery_app import app as celery_app
    from workers.liveness import check_worker, node_name

    health = check_worker(
        celery_app,
        node_name(hostname),
        timeout=timeout,
        time_limit=get_settings().task_time_limit,
    )
    typer.echo(f"{health.node}: {health.reason}")
    if not health.alive:
        raise typer.Exit(1)


@app.command()
def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run the periodic scheduler (sweeper and retraining)."""
    from workers.celery_app import app as celery_app

    celery_app.start(["beat", f"--loglevel={loglevel}"])


@app.command()
def flower(
    address: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 5555,
) -> None:
    """Run Flower on every queue, through Celery events. Its API can start any registered
    task, so off the loopback interface it refuses to run without basic auth."""
    from workers.celery_app import app as celery_app

    auth = get_settings().flower_basic_auth
    if auth is None and address not in ("127.0.0.1", "::1", "localhost"):
        console.print("[red]set T2IROUTE_FLOWER_BASIC_AUTH=user:password to listen there[/red]")
        raise typer.Exit(2)
    argv = ["flower", f"--address={address}", f"--port={port}"]
    if auth is not None:
        argv.append(f"--basic-auth={auth}")
    celery_app.start(argv)


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="The text prompt.")],
    width: Annotated[int | None, typer.Option()] = None,
    height: Annotated[int | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Submit one prompt; prints the request id."""
    from workers.producer import InvalidRequest
    from workers.producer import submit as submit_request

    try:
        result = submit_request(
            prompt,
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            idempotency_key=idempotency_key,
        )
    except InvalidRequest as exc:
        # Plain text on stderr, neither markup nor wrapping: the message is the producer's,
        # the same the Python client raises and the HTTP API answers.
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(2) from None
    typer.echo(result.request_id)
    if not result.created:
        console.print(
            "[yellow]an earlier request with this idempotency key exists[/yellow]", style="dim"
        )


@app.command()
def status(request_id: str) -> None:
    """Show where a request stands, as JSON."""
    from workers.producer import describe

    info = describe(request_id)
    if info is None:
        console.print(f"[red]no request {request_id}[/red]")
        raise typer.Exit(1)
    typer.echo(json.dumps(info, indent=2))


@app.command()
def sweep() -> None:
    """Re-enqueue stuck requests once, now (beat does this periodically)."""
    from workers.tasks import sweep as sweep_task

    console.print(f"re-enqueued {sweep_task()} tasks")


@app.command()
def retrain() -> None:
    """Train a candidate router on the stored pairs now, and promote it if it routes better."""
    from workers.retrain import retrain_router

    _logging("INFO")
    typer.echo(json.dumps(retrain_router(get_settings()).as_dict(), indent=2))


@app.command()
def demo(
    prompts: Annotated[Path | None, typer.Option(help="One prompt per line.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
    embedded: Annotated[
        bool | None,
        typer.Option(
            "--embedded/--servers",
            help=(
                "Run with no servers (SQLite, filesystem broker); default: embedded "
                "unless T2IROUTE_DATABASE_URL or T2IROUTE_BROKER_URL is set."
            ),
        ),
    ] = None,
    three_tiers: Annotated[
        bool,
        typer.Option(help="A pool of three tiers: the small model at 1 and 3 steps, the large."),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every request.")] = 300.0,
) -> None:
    """Run the whole flow on tiny models and print a summary."""
    _quiet_model_libraries()
    from workers.demo import run_demo

    _logging("WARNING")
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    summary = run_demo(
        prompts=prompts,
        workdir=workdir,
        embedded=embedded,
        three_tiers=three_tiers,
        timeout=timeout,
    )
    summary.print(console)
    if summary.report.unfinished:
        raise typer.Exit(1)


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Serve the HTTP producer API (FastAPI) with Prometheus metrics."""
    import uvicorn

    uvicorn.run("workers.api:app", host=host, port=port, log_level="info")


@models_app.command("make-tiny")
def make_tiny(
    directory: Path,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build tiny edge, cloud and CLIP models from configs, offline, into DIRECTORY."""
    _quiet_model_libraries()
    from workers.tiny_models import make_tiny as build

    for name, path in build(directory, seed=seed).items():
        console.print(f"{name}: {path}")


@models_app.command("make-pairs")
def make_pairs(
    prompts: Annotated[Path, typer.Option(help="One prompt per line; '#' starts a comment.")],
    out: Annotated[Path, typer.Option(help="CSV to write: prompt, edge_<m>, cloud_<m>.")],
    models: Annotated[
        Path | None,
        typer.Option(
            help="A folder with edge/, cloud/ and clip/ (as make-tiny writes); "
            "default: T2IROUTE_EDGE_MODEL, T2IROUTE_CLOUD_MODEL and T2IROUTE_CLIP_MODEL."
        ),
    ] = None,
    width: Annotated[int | None, typer.Option(min=8)] = None,
    height: Annotated[int | None, typer.Option(min=8)] = None,
    steps: Annotated[int | None, typer.Option(min=1)] = None,
    seed: Annotated[int, typer.Option(help="Prompt i uses seed + i on both tiers.")] = 0,
) -> None:
    """Generate every prompt on both tiers, score both images on every metric, write a table."""
    from routing.quality import ContrastiveQualityScorer
    from workers.demo import demo_prompts
    from workers.pairs import make_pair_table, write_metric_table
    from workers.pipelines import load_clip, load_pipeline

    settings = get_settings()
    texts = demo_prompts(prompts)
    if not texts:
        console.print(f"[red]{prompts} holds no prompts[/red]")
        raise typer.Exit(2)
    paths = (
        {tier: str(models / tier) for tier in ("edge", "cloud", "clip")}
        if models is not None
        else {
            "edge": settings.edge_model,
            "cloud": settings.cloud_model,
            "clip": settings.clip_model,
        }
    )
    device, dtype, revision = settings.device, settings.torch_dtype, settings.model_revision
    try:
        pipes = {
            tier: load_pipeline(paths[tier], device=device, torch_dtype=dtype, revision=revision)
            for tier in ("edge", "cloud")
        }
        model, processor = load_clip(paths["clip"], device=device, revision=revision)
    except OSError as exc:
        console.print(f"[red]cannot load the models: {exc}[/red]")
        raise typer.Exit(2) from None
    table = make_pair_table(
        texts,
        pipes["edge"],
        pipes["cloud"],
        ContrastiveQualityScorer(model, processor, device=device),
        width=width or settings.default_width,
        height=height or settings.default_height,
        steps=steps or settings.default_steps,
        seed=seed,
    )
    write_metric_table(table, out)
    edge_wins = int((table.edge.mean(axis=1) > table.cloud.mean(axis=1)).sum())
    console.print(
        f"{len(table)} pairs x {len(table.metrics)} metrics -> {out} "
        f"(edge better on mean quality for {edge_wins})"
    )


if __name__ == "__main__":
    app()
