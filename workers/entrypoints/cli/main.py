"""The ``t2iroute`` command line (typer). Each command is a thin wrapper over a function
in workers/ or routing/; heavy imports happen inside the commands that need them."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workers.entrypoints.cli.eval import eval_app
from workers.entrypoints.cli.keys import keys_app
from workers.settings import Settings, get_settings

if TYPE_CHECKING:
    from workers.entrypoints.cli.submit_file import SubmittedLine

app = typer.Typer(help="Edge-cloud routing for text-to-image generation.", no_args_is_help=True)
models_app = typer.Typer(help="Model artefacts and router versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")
app.add_typer(keys_app, name="keys")
console = Console()
# Progress goes to standard error, so that standard output holds only the results.
progress_console = Console(stderr=True)


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


def _quiet_pipeline_loading() -> None:
    """diffusers' "Loading pipeline components" bars, which no environment variable turns
    off (in a worker, Celery would log every refresh of them as a warning)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


@app.callback()
def _every_command() -> None:
    """Edge-cloud routing for text-to-image generation."""
    # Before any command imports a model library, and so for the workers it starts too.
    _quiet_model_libraries()
    _refuse_bad_settings()


def _refuse_bad_settings() -> None:
    """Every command starts from settings that validate (an unknown T2IROUTE_ variable
    included): a refusal is a few plain lines naming each setting, and exit status 2."""
    from pydantic import ValidationError

    try:
        Settings()
    except ValidationError as exc:
        progress_console.print("t2iroute: the settings are refused:", markup=False)
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            progress_console.print(f"  {where}: {message}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _say(text: str) -> None:
    """A line of output as it is: no markup, and a long path kept on one line."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=progress_console,
    )


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
    _quiet_pipeline_loading()
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
        "Build tiny models with `t2iroute models make-tiny` (into T2IROUTE_HOME/var/models, "
        "where the default settings look), or point the setting at a model folder or a hub id.",
        err=True,
    )
    raise typer.Exit(2)


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


@app.command()
def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run the periodic scheduler (sweeper and retraining)."""
    from workers.app.celery_app import app as celery_app

    celery_app.start(["beat", f"--loglevel={loglevel}"])


@app.command()
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


def _json_option(text: str, name: str) -> Any:
    """An option's JSON text as a value; what it must be is the producer's to say, so that
    the command refuses what the HTTP API and the Python producer refuse, in their words."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=name) from None


@app.command()
def submit(
    prompt: Annotated[
        str | None,
        typer.Argument(help="The text prompt; - reads prompts from standard input, one a line."),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            help="Prompts, one a line, or JSON lines with the parameters below (prompt, seed, "
            "width, height, steps, guidance_scale, idempotency_key); - is standard input. "
            "Blank lines and lines starting with # are skipped.",
        ),
    ] = None,
    width: Annotated[int | None, typer.Option()] = None,
    height: Annotated[int | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="For many prompts a prefix: line N gets KEY:N."),
    ] = None,
    callback_url: Annotated[
        str | None, typer.Option(help="POSTed to, signed, when the request ends (docs/api.md).")
    ] = None,
    metadata: Annotated[
        str | None,
        typer.Option(help="A JSON object handed back with the request and its callback."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until every request is final; show the outcome.")
    ] = False,
    timeout: Annotated[float, typer.Option(min=0.0, help="Seconds --wait waits at most.")] = 600.0,
    out: Annotated[
        Path | None,
        typer.Option(help="Write one JSON line per request: id, state, tier, image, quality."),
    ] = None,
) -> None:
    """Submit one prompt and print its request id, or many prompts from a file or standard
    input with a summary. Options apply to every prompt; a JSON line's own values win. With
    --wait, exits 1 unless every request ends done."""
    from workers.entrypoints.cli.submit_file import SubmittedLine
    from workers.services.producer import InvalidRequest
    from workers.services.producer import submit as submit_request

    if (prompt is None) == (file is None):
        raise typer.BadParameter(
            "give one of PROMPT, - (standard input) or --file FILE", param_hint="PROMPT"
        )
    settings = get_settings()
    options: dict[str, Any] = {
        "width": width,
        "height": height,
        "steps": steps,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "idempotency_key": idempotency_key,
        "callback_url": callback_url,
        "metadata": None if metadata is None else _json_option(metadata, "--metadata"),
    }
    if prompt is not None and prompt != "-":
        try:
            result = submit_request(prompt, **options)
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
        submitted = [SubmittedLine(1, result.request_id, result.created)]
        refused: list[str] = []
    else:
        submitted, refused = _submit_many(settings, file if file is not None else "-", options)
    many = prompt is None or prompt == "-"
    _follow(settings, submitted, wait=wait, timeout=timeout, out=out, summary=many)
    if refused:
        raise typer.Exit(2)


def _submit_many(
    settings: Settings, source: str, options: dict[str, Any]
) -> tuple[list[SubmittedLine], list[str]]:
    """Read, validate and submit the prompts of a file or of standard input (``-``); exit 2,
    having submitted nothing, if any line is refused."""
    from workers.entrypoints.cli.submit_file import (
        PromptFileError,
        read_prompt_lines,
        submit_lines,
        validate_lines,
    )

    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        lines = validate_lines(read_prompt_lines(text, name), settings, options, name)
    except OSError as exc:
        typer.echo(f"cannot read {name}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    except UnicodeDecodeError:
        typer.echo(f"{name} is not UTF-8 text", err=True)
        raise typer.Exit(2) from None
    except PromptFileError as exc:
        for problem in exc.problems:
            typer.echo(problem, err=True)
        typer.echo(f"nothing submitted: {len(exc.problems)} lines refused", err=True)
        raise typer.Exit(2) from None
    if not lines:
        typer.echo(f"{name} holds no prompts", err=True)
        raise typer.Exit(2)
    with _progress() as progress:
        task = progress.add_task("submitted", total=len(lines))
        submitted, refused = submit_lines(lines, settings, lambda: progress.advance(task))
    for problem in refused:
        typer.echo(f"{name}, {problem}", err=True)
    return submitted, refused


def _follow(
    settings: Settings,
    submitted: list[SubmittedLine],
    *,
    wait: bool,
    timeout: float,
    out: Path | None,
    summary: bool,
) -> None:
    """After submitting: wait (with --wait), write the records (with --out), and show the
    summary (for many prompts, or after waiting)."""
    from workers.entrypoints.cli.report import print_batch
    from workers.entrypoints.cli.submit_file import wait_until_final, write_records

    ids = [line.request_id for line in submitted]
    if not ids or not (wait or out or summary):
        return
    if wait:
        with _progress() as progress:
            task = progress.add_task("finished", total=len(ids))
            outcome = wait_until_final(
                ids, settings, timeout, lambda n: progress.update(task, completed=n)
            )
    else:
        outcome = wait_until_final(ids, settings, 0.0)
    if out is not None:
        write_records(out, submitted, outcome, settings.image_store)
    if summary or wait:
        print_batch(console, outcome, settings.pool, settings.image_store)
    if out is not None:
        _say(f"one line per request in {out}")
    if wait and outcome.states.get("done", 0) != len(ids):
        raise typer.Exit(1)


@app.command()
def status(request_id: str) -> None:
    """Show where a request stands, as JSON."""
    from workers.services.producer import describe

    info = describe(request_id)
    if info is None:
        console.print(f"[red]no request {request_id}[/red]")
        raise typer.Exit(1)
    typer.echo(json.dumps(info, indent=2))


@app.command()
def report(
    since: Annotated[
        str, typer.Option(help="How far back, by creation time: 30m, 24h, 7d.")
    ] = "24h",
    png: Annotated[
        Path | None,
        typer.Option(help="Also draw tier shares and mean quality over time into this PNG."),
    ] = None,
    bins: Annotated[int, typer.Option(min=2, max=1000, help="Time bins of the chart.")] = 24,
) -> None:
    """The requests of a recent window: states by tier, spend against the budget, the
    trade-off, quality and latency per tier, and the router versions that served."""
    from db.session import session_scope
    from workers.entrypoints.cli.report import plot_window, print_report
    from workers.services.traffic import parse_window, read_series, read_window

    try:
        span = parse_window(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        window = read_window(session, settings, span)
        series = read_series(session, settings.pool, window, bins) if png is not None else None
    print_report(console, window)
    if png is not None and series is not None:
        plot_window(series, png, f"t2iroute, last {since}: {window.requests} requests")
        _say(f"chart: {png}")


@app.command()
def sweep() -> None:
    """Re-enqueue stuck requests once, now (beat does this periodically)."""
    from workers.engine.tasks import sweep as sweep_task

    console.print(f"re-enqueued {sweep_task()} tasks")


@app.command()
def retrain() -> None:
    """Train a candidate router on the stored pairs now, and promote it if the gate finds it
    better; waits for nobody: exits 1 when another retraining run holds the lock."""
    from workers.services.retraining import retrain_lock, retrain_router

    _logging("INFO")
    settings = get_settings()
    with retrain_lock(settings) as held:
        if not held:
            typer.echo("another retraining run holds the lock", err=True)
            raise typer.Exit(1)
        typer.echo(json.dumps(retrain_router(settings).as_dict(), indent=2))


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
    """Run the whole flow on tiny models: progress while it runs, then each prompt's tier and
    image, and what each tier really generated and cost (explorations included)."""
    from rich.progress import TaskID

    from workers.entrypoints.demo import run_demo

    _logging("WARNING")
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    with _progress() as progress:
        tasks: dict[str, TaskID] = {}

        def show(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        summary = run_demo(
            prompts=prompts,
            workdir=workdir,
            embedded=embedded,
            three_tiers=three_tiers,
            timeout=timeout,
            progress=show,
        )
    summary.print(console)
    if summary.outcome.unfinished:
        raise typer.Exit(1)


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Serve the HTTP API (FastAPI) with Prometheus metrics. Off loopback it requires API
    keys (`t2iroute keys create`) unless T2IROUTE_API_AUTH=off."""
    from workers.entrypoints.http.app import serve

    serve(host, port)


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Where to write edge/, cloud/ and clip/; a relative path is under "
            "T2IROUTE_HOME. The default is where the default settings look for them."
        ),
    ] = Path("var/models"),
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build tiny edge, cloud and CLIP models from configs, offline, into DIRECTORY."""
    _quiet_model_libraries()
    from workers.offline.tiny_models import make_tiny as build

    settings = get_settings()
    built = build(settings.home / directory, seed=seed)
    configured = {
        "edge": ("T2IROUTE_EDGE_MODEL", settings.edge_model),
        "cloud": ("T2IROUTE_CLOUD_MODEL", settings.cloud_model),
        "clip": ("T2IROUTE_CLIP_MODEL", settings.clip_model),
    }
    for name, path in built.items():
        variable, used = configured[name]
        note = "" if used == str(path.resolve()) else f"  (the settings use {used}: set {variable})"
        console.print(f"{name}: {path}{note}", highlight=False, markup=False)


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
    from workers.entrypoints.demo import demo_prompts
    from workers.offline.pairs import make_pair_table, write_metric_table
    from workers.services.pipelines import load_clip, load_pipeline

    _quiet_pipeline_loading()
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


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ReasonOption = Annotated[str, typer.Option(help="Why: recorded in the version's history.")]


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """Every router version: held-out evaluation, when it served, the gate's last verdict."""
    from workers.entrypoints.cli.models import list_command

    list_command(get_settings(), console, as_json=as_json)


@models_app.command("show")
def models_show(version: str, as_json: JsonOption = False) -> None:
    """One router version: its files, evaluation, served intervals and event history."""
    from workers.entrypoints.cli.models import show_command

    show_command(get_settings(), console, version, as_json=as_json)


@models_app.command("promote")
def models_promote(version: str, reason: ReasonOption = "promoted by an operator") -> None:
    """Make VERSION the router that serves; router workers load it without a restart."""
    from workers.entrypoints.cli.models import promote_command

    promote_command(get_settings(), console, version, reason=reason)


@models_app.command("rollback")
def models_rollback(reason: ReasonOption = "rolled back by an operator") -> None:
    """Go back to the version that served before the active one, or to the default policy."""
    from workers.entrypoints.cli.models import rollback_command

    rollback_command(get_settings(), console, reason=reason)


if __name__ == "__main__":
    app()
