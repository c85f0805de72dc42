"""The ``t2iroute`` command line (typer): the app, and which module holds each command.

Each module holds one group of commands and imports what a command needs (the Celery app,
the database, torch and the model libraries) inside that command, so that ``t2iroute
--help`` or ``t2iroute status ID`` loads none of them:

* ``serve``: worker, worker-health, beat, flower, api (the long-running processes);
* ``requests``: submit, status, report, sweep;
* ``models``: ``models list|show|promote|rollback`` (router versions), and retrain;
* ``pipelines``: ``pipelines make-tiny|make-pairs`` (text-to-image pipelines as artefacts);
* ``eval``: ``eval ...`` (offline evaluation of routers); ``keys``: ``keys ...`` (API keys);
* ``demo``: demo; ``migrate``: migrate.
"""

from __future__ import annotations

import typer

from workers.entrypoints.cli import demo, eval, keys, migrate, models, pipelines, requests, serve
from workers.entrypoints.cli.output import progress_console, quiet_model_libraries
from workers.settings import Settings

app = typer.Typer(help="Edge-cloud routing for text-to-image generation.", no_args_is_help=True)


@app.callback()
def _every_command() -> None:
    """Edge-cloud routing for text-to-image generation."""
    # Before any command imports a model library, and so for the workers it starts too.
    quiet_model_libraries()
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


app.command()(migrate.migrate)
app.command()(serve.worker)
app.command("worker-health")(serve.worker_health)
app.command()(serve.beat)
app.command()(serve.flower)
app.command()(requests.submit)
app.command()(requests.status)
app.command()(requests.report)
app.command()(requests.sweep)
app.command()(models.retrain)
app.command()(demo.demo)
app.command()(serve.api)
app.add_typer(models.models_app, name="models")
app.add_typer(pipelines.pipelines_app, name="pipelines")
app.add_typer(eval.eval_app, name="eval")
app.add_typer(keys.keys_app, name="keys")


if __name__ == "__main__":
    app()
