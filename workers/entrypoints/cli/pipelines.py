"""``t2iroute pipelines make-tiny|make-pairs``: the text-to-image pipelines the tiers run and
the CLIP model that scores them, as artefacts: tiny ones built from configs, and the labelled
pairs made by running both tiers on every prompt. (``t2iroute models`` is the router
versions'.)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workers.entrypoints.cli.output import console, quiet_model_libraries, quiet_pipeline_loading
from workers.settings import get_settings

pipelines_app = typer.Typer(
    help="Text-to-image pipelines: build tiny ones, label prompts on both tiers.",
    no_args_is_help=True,
)


@pipelines_app.command("make-tiny")
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
    quiet_model_libraries()
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


@pipelines_app.command("make-pairs")
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

    quiet_pipeline_loading()
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
