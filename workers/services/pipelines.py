"""Model loading for the generation and quality workers.

Real weights are configuration: every model loads through ``from_pretrained(path_or_id)`` with
safetensors only and no remote code. The tiny models of ``workers.offline.tiny_models`` go through
the
very code path a production SD2.1 / SD3 / CLIP checkpoint takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

# From their modules rather than the package root, whose lazy namespace type checkers resolve
# to diffusers' placeholder classes.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import (
    CLIPModel,
    CLIPProcessor,
)

_DEFAULT_REVISION = "main"  # the hub's default branch; ignored for local folders


# SD3 can run without its T5 encoder (diffusers then feeds zeros in its place); the tiny cloud
# model has none, and an operator may drop it from a real checkout to save 9 GB.
_SD3_OPTIONAL_ENCODERS: tuple[str, ...] = ("text_encoder_3", "tokenizer_3")


def load_pipeline(
    path_or_id: str,
    *,
    device: str = "cpu",
    torch_dtype: str = "float32",
    revision: str | None = None,
) -> DiffusionPipeline:
    """Load a diffusers pipeline from a local folder or a hub id, ready to generate.

    ``use_safetensors=True`` makes diffusers refuse pickled weights instead of falling back
    to them, and remote code is never trusted; the pipeline class comes from the folder's
    ``model_index.json``.
    """
    _check_local_model(path_or_id)
    extra = _absent_optional_encoders(path_or_id, revision)
    pipe = DiffusionPipeline.from_pretrained(
        path_or_id,
        use_safetensors=True,
        trust_remote_code=False,
        revision=revision,
        dtype=_dtype(torch_dtype),
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(
    pipe: DiffusionPipeline,
    prompt: str,
    *,
    width: int,
    height: int,
    steps: int,
    seed: int,
    guidance_scale: float | None = None,
) -> Image.Image:
    """One image for one prompt; the same seed on the same device gives the same image.

    ``guidance_scale=None`` keeps the pipeline's own default, which differs between SD2.1
    and SD3.
    """
    return generate_many(
        pipe,
        [prompt],
        [seed],
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
    )[0]


def generate_many(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float | None = None,
) -> list[Image.Image]:
    """One image per prompt, in one pipeline call: the prompts share the size, steps and
    guidance; each keeps its own seed (a generator per prompt, so its starting latents are
    the ones it would get alone)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in seeds]
    kwargs: dict[str, Any] = {}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    # Every concrete pipeline is callable; the base class declares no __call__.
    run = cast(Callable[..., Any], pipe)
    result = run(
        list(prompts),
        width=width,
        height=height,
        num_inference_steps=steps,
        generator=generators,
        output_type="pil",
        **kwargs,
    )
    images: list[Image.Image] = list(result.images)
    return images


def load_clip(
    path_or_id: str, *, device: str = "cpu", revision: str | None = None
) -> tuple[CLIPModel, CLIPProcessor]:
    """Load the CLIP model that scores image quality, in float32 and evaluation mode.

    Float32 whatever the checkpoint's dtype: quality scores are compared across tiers and
    over time, so they should not depend on the precision the weights were shipped in.
    """
    _check_local_model(path_or_id)
    model = CLIPModel.from_pretrained(
        path_or_id,
        use_safetensors=True,
        trust_remote_code=False,
        revision=revision or _DEFAULT_REVISION,
        dtype=torch.float32,
    )
    processor = CLIPProcessor.from_pretrained(path_or_id, revision=revision or _DEFAULT_REVISION)
    # transformers types its wrapper of Module.to as if it took the model again.
    return model.to(device).eval(), processor  # type: ignore[arg-type]


class ModelFolderError(OSError):
    """A model path that cannot be loaded as configured: missing, or pickled weights only."""


_PICKLED_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})


def _check_local_model(path_or_id: str) -> None:
    """Fail early, with the reason, on a local path the loaders would only half explain.

    A path that exists, or that cannot be a hub id (``namespace/name``), is a local folder;
    the libraries would otherwise report it as a failed hub download. A folder in which some
    part has pickled weights and no safetensors is refused by name, since loading pickles
    runs arbitrary code.
    """
    local = Path(path_or_id).expanduser()
    if not local.exists():
        if local.is_absolute() or path_or_id.startswith((".", "~")) or path_or_id.count("/") > 1:
            raise ModelFolderError(f"no model folder at {path_or_id}")
        return
    if not local.is_dir():
        raise ModelFolderError(f"{path_or_id} is a file; expected a model folder")
    folders = {path.parent for path in local.rglob("*") if path.suffix in _PICKLED_SUFFIXES}
    for folder in sorted(folders):
        if not any(folder.glob("*.safetensors")):
            raise ModelFolderError(
                f"{folder} holds pickled weights only; models load from safetensors only "
                "(convert them, e.g. save_pretrained(..., safe_serialization=True))"
            )


def _dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; settings hold dtypes as strings."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def _absent_optional_encoders(path_or_id: str, revision: str | None) -> dict[str, None]:
    """``{"text_encoder_3": None, ...}`` for SD3 encoders the checkpoint does not ship.

    Without these overrides ``from_pretrained`` insists on loading every component listed in
    ``model_index.json``. A local folder counts as lacking a component when its subfolder is
    missing, even if the index still names it.
    """
    index = cast(dict[str, Any], DiffusionPipeline.load_config(path_or_id, revision=revision))
    if index.get("_class_name") != StableDiffusion3Pipeline.__name__:
        return {}
    local = Path(path_or_id)
    absent: dict[str, None] = {}
    for name in _SD3_OPTIONAL_ENCODERS:
        library, _ = index.get(name) or (None, None)
        if library is None or (local.is_dir() and not (local / name).is_dir()):
            absent[name] = None
    return absent
