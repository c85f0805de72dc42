"""The tiny models, and the loaders real weights go through: build, save, reload, generate."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    StableDiffusion3Pipeline,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel

from routing.metrics import METRICS
from workers.offline.tiny_models import make_tiny
from workers.services.pipelines import ModelFolderError, generate, load_clip, load_pipeline

PROMPT = "A photo of a cat on a red sofa"
SIZE = {"width": 64, "height": 48, "steps": 2}


@pytest.fixture(scope="module")
def pipelines(tiny_models: dict[str, Path]) -> dict[str, DiffusionPipeline]:
    return {tier: load_pipeline(str(tiny_models[tier])) for tier in ("edge", "cloud")}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_make_tiny_builds_edge_cloud_and_clip(tiny_models: dict[str, Path]) -> None:
    assert set(tiny_models) == {"edge", "cloud", "clip"}
    assert (tiny_models["edge"] / "model_index.json").is_file()
    assert (tiny_models["cloud"] / "model_index.json").is_file()
    assert (tiny_models["clip"] / "config.json").is_file()


@pytest.mark.parametrize("tier", ["edge", "cloud", "clip"])
def test_weights_on_disk_are_safetensors_only(tiny_models: dict[str, Path], tier: str) -> None:
    files = [path for path in tiny_models[tier].rglob("*") if path.is_file()]
    weights = [path for path in files if path.suffix in {".safetensors", ".bin", ".pt", ".ckpt"}]
    assert weights
    assert all(path.suffix == ".safetensors" for path in weights), weights


def test_pipelines_reload_as_their_classes(pipelines: dict[str, DiffusionPipeline]) -> None:
    edge, cloud = pipelines["edge"], pipelines["cloud"]
    assert isinstance(edge, StableDiffusionPipeline)
    assert edge.safety_checker is None
    assert isinstance(cloud, StableDiffusion3Pipeline)
    assert cloud.text_encoder_3 is None and cloud.tokenizer_3 is None


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_generate_gives_the_requested_size(
    pipelines: dict[str, DiffusionPipeline], tier: str
) -> None:
    image = generate(pipelines[tier], PROMPT, seed=0, **SIZE)
    assert image.size == (64, 48)
    assert image.mode == "RGB"


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_generate_is_deterministic_per_seed(
    pipelines: dict[str, DiffusionPipeline], tier: str
) -> None:
    first = pixels(generate(pipelines[tier], PROMPT, seed=7, **SIZE))
    again = pixels(generate(pipelines[tier], PROMPT, seed=7, **SIZE))
    other = pixels(generate(pipelines[tier], PROMPT, seed=8, **SIZE))
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0


@pytest.mark.parametrize("tier", ["edge", "cloud"])
def test_prompt_and_guidance_change_the_image(
    pipelines: dict[str, DiffusionPipeline], tier: str
) -> None:
    base = pixels(generate(pipelines[tier], PROMPT, seed=0, guidance_scale=5.0, **SIZE))
    prompt = pixels(generate(pipelines[tier], "a dog", seed=0, guidance_scale=5.0, **SIZE))
    guided = pixels(generate(pipelines[tier], PROMPT, seed=0, guidance_scale=9.0, **SIZE))
    assert np.abs(base - prompt).max() > 0
    assert np.abs(base - guided).max() > 0


def test_edge_and_cloud_make_different_images(pipelines: dict[str, DiffusionPipeline]) -> None:
    edge = pixels(generate(pipelines["edge"], PROMPT, seed=0, **SIZE))
    cloud = pixels(generate(pipelines["cloud"], PROMPT, seed=0, **SIZE))
    assert np.abs(edge - cloud).mean() > 1


def test_prompts_tokenize_as_words(pipelines: dict[str, DiffusionPipeline]) -> None:
    tokenizer = pipelines["edge"].tokenizer
    tokens = tokenizer.tokenize(f"{PROMPT}. {METRICS[0].positive}")
    assert tokens[:3] == ["a</w>", "photo</w>", "of</w>"]
    assert "definition</w>" in tokens
    # The pipelines truncate to the tokenizer's limit, CLIP's 77 positions.
    assert len(tokenizer("x" * 500, truncation=True).input_ids) == 77


def test_overlong_prompt_still_generates(pipelines: dict[str, DiffusionPipeline]) -> None:
    image = generate(pipelines["cloud"], "a red cat " * 60, seed=0, **SIZE)
    assert image.size == (64, 48)


def to_pickles(folder: Path) -> None:
    """Replace every safetensors file under ``folder`` with a pickled ``.bin`` twin."""
    for path in list(folder.rglob("*.safetensors")):
        name = "pytorch_model.bin" if path.name == "model.safetensors" else path.stem + ".bin"
        torch.save(load_file(path), path.with_name(name))
        path.unlink()


def test_pickled_pipeline_weights_are_refused(
    pipelines: dict[str, DiffusionPipeline], tmp_path: Path
) -> None:
    pipelines["edge"].save_pretrained(tmp_path, safe_serialization=False)
    to_pickles(tmp_path)
    assert list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.safetensors"))
    with pytest.raises(ModelFolderError, match=r"pickled weights only.*safetensors"):
        load_pipeline(str(tmp_path))


def test_pickled_clip_weights_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    shutil.copytree(tiny_models["clip"], folder)
    to_pickles(folder)
    with pytest.raises(ModelFolderError, match="pickled weights only"):
        load_clip(str(folder))


@pytest.mark.parametrize("loader", [load_pipeline, load_clip])
def test_missing_folder_is_a_clear_error(loader: Callable[[str], object], tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="no model folder at"):
        loader(str(tmp_path / "absent"))


def test_unknown_hub_id_offline_is_an_os_error() -> None:
    with pytest.raises(OSError, match="nobody/no-such-model"):
        load_pipeline("nobody/no-such-model")


def test_tiny_models_are_deterministic_per_seed(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    first = load_file(tiny_models["edge"] / weights)
    assert all(torch.equal(first[k], v) for k, v in load_file(again["edge"] / weights).items())
    assert any(not torch.equal(first[k], v) for k, v in load_file(other["edge"] / weights).items())


def test_sd3_loads_without_the_t5_folder_its_index_names(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "cloud"
    shutil.copytree(tiny_models["cloud"], folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index))
    pipe = load_pipeline(str(folder))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.text_encoder_3 is None


def test_unknown_dtype_is_a_clear_error(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(str(tiny_models["edge"]), torch_dtype="float33")


def test_load_clip(tiny_models: dict[str, Path]) -> None:
    model, processor = load_clip(str(tiny_models["clip"]))
    assert isinstance(model, CLIPModel)
    assert not model.training
    ids = processor(text=[METRICS[0].negative], return_tensors="pt")["input_ids"]
    # start, "low", "definition", "photo", ".", end: the metric words are whole tokens.
    assert ids.shape == (1, 6)
