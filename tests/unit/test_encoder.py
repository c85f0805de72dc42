"""The frozen encoder: token states with a mask, a memo that never changes the answer, and the
real MiniLM as the default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from routing.encoder import FrozenTextEncoder, default_encoder_path
from tests.unit.tiny_text_encoder import build_tiny_encoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> FrozenTextEncoder:
    path = build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))
    return FrozenTextEncoder(path, cache_size=4)


def test_token_states_are_padded_and_masked(tiny: FrozenTextEncoder) -> None:
    states, mask = tiny.token_states(["a cat", "a big red dog on the moon"])
    assert states.shape[0] == 2 and states.shape[2] == tiny.dim == 32
    # [CLS] a cat [SEP] against [CLS] + 7 words + [SEP].
    assert mask.sum(1).tolist() == [4, 9]
    assert torch.all(states[0, 4:] == 0)


def test_memo_returns_what_a_fresh_forward_pass_returns(tiny: FrozenTextEncoder) -> None:
    prompts = ["a cat", "two dogs", "an old castle", "a red boat", "the moon", "a bird"]
    first, _ = tiny.token_states(prompts)  # more prompts than the memo holds
    assert len(tiny._cache) <= tiny.cache_size
    again, mask = tiny.token_states(list(reversed(prompts)))
    torch.testing.assert_close(again, first.flip(0)[:, : again.shape[1]])
    fresh = tiny._forward(["an old castle"])[0]
    torch.testing.assert_close(again[3, : int(mask[3].sum())], fresh)


def test_encoder_is_frozen(tiny: FrozenTextEncoder) -> None:
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training


def test_pooled_vectors_are_unit_length(tiny: FrozenTextEncoder) -> None:
    pooled = tiny.pooled(["a cat", "a dog under a tree"])
    assert pooled.shape == (2, 32)
    assert abs(float((pooled**2).sum(1).max()) - 1.0) < 1e-5


def test_empty_batch(tiny: FrozenTextEncoder) -> None:
    states, mask = tiny.token_states([])
    assert states.shape == (0, 0, 32) and mask.shape == (0, 0)


def test_default_is_the_real_minilm() -> None:
    path = default_encoder_path()
    assert (Path(path) / "model.safetensors").is_file()
    encoder = FrozenTextEncoder()
    assert encoder.dim == 384 and encoder.model.config.num_hidden_layers == 6
    pooled = encoder.pooled(["a photo of a cat", "a picture of a cat", "a tax form"])
    similar, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    # A trained sentence encoder puts paraphrases closer than unrelated text; random weights
    # would not.
    assert similar > 0.8 and similar > unrelated + 0.3


def test_layer_picks_an_earlier_hidden_state(tmp_path: Path) -> None:
    path = build_tiny_encoder(tmp_path)
    last = FrozenTextEncoder(path)
    first_layer = FrozenTextEncoder(path, layer=1)
    prompts = ["a cat on a mat"]
    states, mask = first_layer.token_states(prompts)
    assert states.shape == last.token_states(prompts)[0].shape
    assert not torch.allclose(states, last.token_states(prompts)[0])
    batch = first_layer.tokenizer(prompts, return_tensors="pt")
    expected = first_layer.model(**batch, output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(states[0, : int(mask[0].sum())], expected)
    layers = int(last.model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="out of range"):
        FrozenTextEncoder(path, layer=layers + 1)


def _text_states(model: CLIPTextModel, encoder: FrozenTextEncoder, prompt: str) -> torch.Tensor:
    """The hidden states of ``encoder.layer`` computed with the text model loaded directly."""
    batch = encoder.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[encoder.layer]
    return hidden[0]


def test_reads_the_text_tower_of_a_whole_clip_checkpoint(tiny_models: dict[str, Path]) -> None:
    """A CLIP checkpoint holds an image and a text tower; the encoder is its text tower, with
    the weights the checkpoint stores (not a fresh initialisation)."""
    encoder = FrozenTextEncoder(tiny_models["clip"], layer=-2)
    assert isinstance(encoder.model, CLIPTextModel)
    direct = CLIPTextModel.from_pretrained(tiny_models["clip"], use_safetensors=True).eval()
    states, mask = encoder.token_states(["a red cat on a mat"])
    assert encoder.dim == direct.config.hidden_size
    expected = _text_states(direct, encoder, "a red cat on a mat")
    torch.testing.assert_close(states[0, : int(mask[0].sum())], expected)


@pytest.mark.parametrize("where", ["pipeline", "text_encoder"])
def test_reads_a_pipelines_text_encoder(tiny_models: dict[str, Path], where: str) -> None:
    """The edge pipeline's own CLIP text encoder, named by the pipeline folder or by its
    ``text_encoder`` folder (whose tokenizer is the sibling ``tokenizer`` folder)."""
    pipeline = tiny_models["edge"]
    path = pipeline if where == "pipeline" else pipeline / "text_encoder"
    encoder = FrozenTextEncoder(path)
    direct = CLIPTextModel.from_pretrained(
        pipeline, subfolder="text_encoder", use_safetensors=True
    ).eval()
    assert (
        encoder.tokenizer("two dogs")["input_ids"]
        == direct_tokenizer(pipeline)("two dogs")["input_ids"]
    )
    states, mask = encoder.token_states(["two dogs in the snow"])
    expected = _text_states(direct, encoder, "two dogs in the snow")
    torch.testing.assert_close(states[0, : int(mask[0].sum())], expected)


def direct_tokenizer(pipeline: Path) -> CLIPTokenizer:
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    return tokenizer
