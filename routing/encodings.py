"""The encodings that the learned routers of one run share: one frozen text encoder, built on
first use, and its memos (pooled embeddings, top-layer inputs). The registry's builders and the
harnesses both take it from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routing.bert_router import TopLayerInputs
    from routing.embedding_baselines import PooledEmbeddings
    from routing.encoder import FrozenTextEncoder

__all__ = ["SharedEncoding"]


class SharedEncoding:
    """One frozen encoder and its memos for all the routers of a run, built on first use, so
    that 25 folds times several routers encode every prompt once (RouteT2I reads the same
    encoder's token memo through ``routing.routet2i.shared_encoder``)."""

    def __init__(self, encoder: FrozenTextEncoder | None = None) -> None:
        self._encoder = encoder
        self._pooled: PooledEmbeddings | None = None
        self._top_layer: TopLayerInputs | None = None

    @property
    def encoder(self) -> FrozenTextEncoder:
        if self._encoder is None:
            from routing.routet2i import RouteT2IConfig, shared_encoder

            defaults = RouteT2IConfig()
            self._encoder = shared_encoder(
                defaults.encoder, defaults.encoder_revision, defaults.max_length
            )
        return self._encoder

    @property
    def pooled(self) -> PooledEmbeddings:
        if self._pooled is None:
            from routing.embedding_baselines import PooledEmbeddings

            self._pooled = PooledEmbeddings(self.encoder)
        return self._pooled

    @property
    def top_layer(self) -> TopLayerInputs:
        if self._top_layer is None:
            from routing.bert_router import TopLayerInputs

            self._top_layer = TopLayerInputs(self.encoder)
        return self._top_layer
