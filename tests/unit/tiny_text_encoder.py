"""A tiny random BERT saved like real weights (safetensors + vocab file), so tests load it
through the same ``FrozenTextEncoder`` code path as the real MiniLM (after diffusers'
``get_dummy_components``)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "cat",
    "dog",
    "bird",
    "house",
    "tree",
    "car",
    "boat",
    "castle",
    "dragon",
    "river",
    "moon",
    "three",
    "two",
    "left",
    "right",
    "under",
    "above",
    "photo",
    "painting",
    "sunny",
    "old",
)


def build_tiny_encoder(directory: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """Write a 2-layer random BERT and its WordPiece vocabulary to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join((*SPECIAL_TOKENS, *WORDS)) + "\n")
    vocab = {token: i for i, token in enumerate(vocab_file.read_text().split())}
    BertTokenizer(vocab=vocab).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    return directory
