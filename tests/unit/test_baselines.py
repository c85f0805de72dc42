"""The baselines: heuristic scores, the oracle, and the learned routers over a tiny random BERT
loaded through the same ``FrozenTextEncoder`` path as the real MiniLM."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from routing.baselines import (
    NounCountRouter,
    OracleRouter,
    PromptLengthRouter,
    RandomRouter,
    decreasing_score,
)
from routing.bert_router import BertClassifierRouter, ClsTopLayer, TopLayerInputs
from routing.embedding_baselines import (
    MatrixFactorisationRouter,
    PooledEmbeddings,
    SimilarityRankingRouter,
    ZooterRouter,
)
from routing.encoder import FrozenTextEncoder
from routing.registry import load_pair_router, save_router
from routing.types import PairTable, Router
from tests.unit.tiny_text_encoder import build_tiny_encoder

COLOURS = ("red", "blue", "green", "big", "small", "old")
THINGS = ("cat", "dog", "bird", "house", "tree", "car", "boat", "castle", "dragon", "moon")
PLACES = ("on the river", "under the tree", "in the house", "above the moon", "")
HARD = ("castle", "dragon")


def word_table() -> PairTable:
    """Prompts from the tiny vocabulary: with a castle or a dragon (a fifth of them) the cloud
    is better by two, otherwise the edge is better by a quarter; on average the cloud gains."""
    prompts = tuple(
        f"a {c} {t} {p}".strip() for c, t, p in itertools.product(COLOURS, THINGS, PLACES)
    )
    hard = np.array([any(w in p.split() for w in HARD) for p in prompts])
    edge = np.where(hard, 2.0, 3.0)[:, None]
    cloud = np.where(hard, 4.0, 2.75)[:, None]
    return PairTable(prompts=prompts, edge=edge, cloud=cloud, metrics=("rating",))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> FrozenTextEncoder:
    torch.set_num_threads(1)
    return FrozenTextEncoder(build_tiny_encoder(tmp_path_factory.mktemp("encoder")))


def hard_mask(prompts: tuple[str, ...]) -> np.ndarray:
    return np.array([any(w in p.split() for w in HARD) for p in prompts])


def test_decreasing_score_is_half_at_centre() -> None:
    np.testing.assert_allclose(decreasing_score(np.array([0.0, 4.0, 12.0]), 4.0), [1, 0.5, 0.25])


def test_random_router_is_reproducible_per_prompt(tmp_path: Path) -> None:
    prompts = [f"prompt {i}" for i in range(200)]
    router = RandomRouter(seed=3)
    scores = router.predict_prs(prompts)
    np.testing.assert_array_equal(router.predict_prs(prompts[::-1]), scores[::-1])
    assert not np.allclose(RandomRouter(seed=4).predict_prs(prompts), scores)
    assert scores.min() >= 0.0 and scores.max() < 1.0 and abs(scores.mean() - 0.5) < 0.1
    save_router(router, tmp_path / "random")
    np.testing.assert_array_equal(
        load_pair_router(tmp_path / "random").predict_prs(prompts), scores
    )


def test_prompt_length_sends_longer_prompts_to_cloud(tmp_path: Path) -> None:
    router = PromptLengthRouter()
    train = PairTable(
        prompts=("one two", "one two three four", "a b c d e f"),
        edge=np.zeros((3, 1)),
        cloud=np.ones((3, 1)),
        metrics=("rating",),
    )
    router.fit(train)
    assert router.centre == 4.0
    short, middle, long = router.predict_prs(["a cat", "a red cat here", "a b c d e f g h"])
    assert short > middle == 0.5 > long
    save_router(router, tmp_path / "length")
    assert load_pair_router(tmp_path / "length").predict_prs(["a cat"])[0] == short


def test_noun_count_uses_the_spacy_tagger(tmp_path: Path) -> None:
    router = NounCountRouter(centre=2.0)
    counts = router.counts(["a red cat sits", "three dogs chase a cat near the Eiffel Tower"])
    np.testing.assert_array_equal(counts, [1.0, 4.0])
    few, many = router.predict_prs(["a red cat sits", "three dogs chase a cat near the tower"])
    assert few > 0.5 > many
    save_router(router, tmp_path / "nouns")
    assert load_pair_router(tmp_path / "nouns").predict_prs(["a red cat sits"])[0] == few


def test_oracle_ranks_by_true_gain() -> None:
    table = PairTable(
        prompts=("x", "y", "z"),
        edge=np.array([[3.0], [1.0], [2.0]]),
        cloud=np.array([[3.0], [4.0], [2.5]]),
        metrics=("rating",),
    )
    oracle = OracleRouter(table)
    assert list(np.argsort(oracle.predict_prs(["x", "y", "z"]))) == [1, 2, 0]
    with pytest.raises(KeyError, match="no label"):
        oracle.predict_prs(["unseen"])


def test_every_baseline_satisfies_the_router_protocol(encoder: FrozenTextEncoder) -> None:
    pooled = PooledEmbeddings(encoder)
    routers = [
        RandomRouter(),
        PromptLengthRouter(),
        NounCountRouter(),
        OracleRouter(word_table()),
        SimilarityRankingRouter(pooled),
        MatrixFactorisationRouter(pooled),
        ZooterRouter(pooled),
        BertClassifierRouter(encoder),
    ]
    assert all(isinstance(r, Router) for r in routers)


def test_pooled_embeddings_are_unit_and_memoised(encoder: FrozenTextEncoder) -> None:
    pooled = PooledEmbeddings(encoder, batch_size=3)
    prompts = ["a red cat", "a blue dog", "a red cat", "the old castle", "a moon"]
    vectors = pooled(prompts)
    assert vectors.shape == (5, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_allclose(pooled(["a blue dog"])[0], vectors[1], rtol=1e-6)
    assert pooled([]).shape == (0, encoder.dim)


@pytest.mark.parametrize("kind", ["sw_ranking", "matrix_factorisation", "zooter", "bert"])
def test_learned_baselines_learn_a_word_rule(encoder: FrozenTextEncoder, kind: str) -> None:
    """Trained on half the prompts, each router scores the unseen castle/dragon prompts as
    more cloud-worthy (lower PRS) than the rest, far better than chance ordering would."""
    table = word_table()
    order = np.random.default_rng(0).permutation(len(table))
    train, test = table.take(order[::2]), table.take(order[1::2])
    pooled = PooledEmbeddings(encoder)
    routers: dict[str, Router] = {
        "sw_ranking": SimilarityRankingRouter(pooled),
        "matrix_factorisation": MatrixFactorisationRouter(pooled),
        "zooter": ZooterRouter(pooled),
        "bert": BertClassifierRouter(encoder, epochs=20, layer_lr=1e-3),
    }
    router = routers[kind]
    router.fit(train)
    prs = router.predict_prs(test.prompts)
    hard = hard_mask(test.prompts)
    # AUC of "hard prompt" against low PRS: 1/2 for a ranking unrelated to the rule.
    auc = np.mean(prs[hard][:, None] < prs[~hard][None, :])
    assert auc > 0.75, f"{kind}: AUC {auc:.2f}"


def test_learned_baselines_refuse_to_predict_unfitted(encoder: FrozenTextEncoder) -> None:
    pooled = PooledEmbeddings(encoder)
    for router in (
        SimilarityRankingRouter(pooled),
        MatrixFactorisationRouter(pooled),
        ZooterRouter(pooled),
        BertClassifierRouter(encoder),
    ):
        with pytest.raises(RuntimeError, match="not fitted"):
            router.predict_prs(["a cat"])


def test_zooter_target_keeps_the_size_of_the_gap(encoder: FrozenTextEncoder) -> None:
    table = PairTable(
        prompts=("a", "b", "c", "d"),
        edge=np.array([[1.0], [2.0], [3.0], [3.0]]),
        cloud=np.array([[4.0], [2.5], [3.0], [1.0]]),
        metrics=("rating",),
    )
    target = ZooterRouter(PooledEmbeddings(encoder)).target(table)
    assert target[0] > target[1] > target[2] > target[3]
    assert target[2] == pytest.approx(0.5)


def test_cls_top_layer_matches_the_full_layer(encoder: FrozenTextEncoder) -> None:
    """The [CLS]-only copy of the top layer gives the encoder's own last state at [CLS]."""
    prompts = ["a red cat on the house", "the dragon", "two small birds above the old tree"]
    inputs = TopLayerInputs(encoder)
    states, mask = inputs.states(prompts)
    layer = ClsTopLayer(inputs.top_layer()).eval()
    with torch.no_grad():
        cls = layer(states, mask)
        batch = encoder.tokenizer(prompts, padding=True, return_tensors="pt")
        full = encoder.model(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(cls, full, rtol=1e-4, atol=1e-5)


def test_bert_router_trains_only_its_copy(encoder: FrozenTextEncoder) -> None:
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    router = BertClassifierRouter(encoder, epochs=1)
    router.fit(word_table())
    for key, value in encoder.model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    with pytest.raises(ValueError, match="same encoder"):
        BertClassifierRouter(encoder, inputs=TopLayerInputs(_other(encoder)))


def _other(encoder: FrozenTextEncoder) -> FrozenTextEncoder:
    return FrozenTextEncoder(encoder.path)
