"""What a client does from the shell: ``t2iroute submit`` (one prompt, or many from a file
or standard input), ``status``, ``report`` and ``sweep``. ``t2iroute status ID`` imports the
producer and the database, never a model library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from workers.entrypoints.cli.output import console, progress_bars, say
from workers.settings import Settings, get_settings

if TYPE_CHECKING:
    from workers.entrypoints.cli.submit_file import SubmittedLine


def _json_option(text: str, name: str) -> Any:
    """An option's JSON text as a value; what it must be is the producer's to say, so that
    the command refuses what the HTTP API and the Python producer refuse, in their words."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=name) from None


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
    with progress_bars() as progress:
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
        with progress_bars() as progress:
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
        say(f"one line per request in {out}")
    if wait and outcome.states.get("done", 0) != len(ids):
        raise typer.Exit(1)


def status(request_id: str) -> None:
    """Show where a request stands, as JSON."""
    from workers.services.producer import describe

    info = describe(request_id)
    if info is None:
        console.print(f"[red]no request {request_id}[/red]")
        raise typer.Exit(1)
    typer.echo(json.dumps(info, indent=2))


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
        say(f"chart: {png}")


def sweep() -> None:
    """Re-enqueue stuck requests once, now (beat does this periodically)."""
    from workers.engine.tasks import sweep as sweep_task

    console.print(f"re-enqueued {sweep_task()} tasks")
