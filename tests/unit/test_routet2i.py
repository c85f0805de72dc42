"""The RouteT2I router on a tiny random encoder: the gate picks K real tokens, the ablations
change the computation, training learns a planted rule, and a saved router is the same router."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from routing.calibrate import calibrate_alpha, route_to_cloud
from routing.encoder import FrozenTextEncoder
from routing.prs import PRSParams
from routing.registry import load_pair_router, load_router, save_router
from routing.routet2i import (
    RouteT2IConfig,
    RouteT2IEnsemble,
    RouteT2IModel,
    RouteT2IRouter,
    pairwise_rank_loss,
)
from routing.types import PairTable, PersistentRouter
from tests.unit.tiny_text_encoder import WORDS, build_tiny_encoder

KEYWORD = "dragon"
FILLER = tuple(w for w in WORDS if w != KEYWORD)
METRICS = ("detail", "layout", "realism")
FAST = RouteT2IConfig(epochs=30, lr=1e-2, top_k=4, rank=8, score_dim=8, batch_size=32, ensemble=1)


def planted_table(n: int, seed: int) -> PairTable:
    """Prompts of 3 to 8 filler words; half also hold the keyword, and for those the cloud
    image is better on every metric, for the others the edge image is (up to noise)."""
    rng = np.random.default_rng(seed)
    prompts, hard = [], []
    for i in range(n):
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 9))))
        if i % 2:
            words.insert(int(rng.integers(0, len(words) + 1)), KEYWORD)
        prompts.append(" ".join(words))
        hard.append(i % 2 == 1)
    gap = np.where(np.array(hard), -1.0, 1.0)[:, None] * np.array([1.0, 0.6, 0.8])
    edge = 3.0 + 0.5 * gap + rng.normal(0, 0.2, (n, len(METRICS)))
    cloud = 3.0 - 0.5 * gap + rng.normal(0, 0.2, (n, len(METRICS)))
    return PairTable(tuple(prompts), edge, cloud, METRICS)


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive (cloud-better) prompt scores below a negative one."""
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] < neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> FrozenTextEncoder:
    return FrozenTextEncoder(build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder")))


@pytest.fixture(scope="module")
def train() -> PairTable:
    return planted_table(160, seed=1)


@pytest.fixture(scope="module")
def held_out() -> PairTable:
    return planted_table(60, seed=2)


@pytest.fixture(scope="module")
def router(tiny: FrozenTextEncoder, train: PairTable) -> RouteT2IRouter:
    fitted = RouteT2IRouter(FAST, encoder=tiny)
    fitted.fit(train)
    return fitted


def test_predictions_have_the_documented_shapes(router: RouteT2IRouter) -> None:
    prompts = ["a cat", "a dragon above the old castle", "two birds"]
    distance = router.predict_metrics(prompts)
    prs = router.predict_prs(prompts)
    assert distance.shape == (3, len(METRICS)) and prs.shape == (3,)
    assert np.all((distance > 0) & (distance < 1))
    np.testing.assert_allclose(prs, distance.mean(1), rtol=1e-6)
    assert router.predict_prs([]).shape == (0,)
    assert router.config.n_metrics == 3 and router.config.hidden == 32
    assert isinstance(router, PersistentRouter)


def test_gate_keeps_the_top_k_real_tokens(tiny: FrozenTextEncoder) -> None:
    config = dataclasses.replace(FAST, n_metrics=2, hidden=tiny.dim, top_k=3)
    model = RouteT2IModel(config, (0.5, 0.5)).eval()
    states, mask = tiny.token_states(["a cat", "a big red dog on the old river"])
    states = model.norm(states)
    index, weights = model.select_tokens(states, mask)
    assert index.shape == weights.shape == (2, 2, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2))
    assert model.expert_embeddings is not None
    logits = torch.einsum("nld,ed->nel", states, model.expert_embeddings)
    long_prompt = logits[1].topk(3, dim=-1).indices.sort(-1).values
    assert torch.equal(index[1].sort(-1).values, long_prompt)
    # The short prompt has 4 real tokens: every kept token with weight is a real one.
    kept = index[0][weights[0] > 0]
    assert bool(mask[0, kept].all())


def test_without_token_selection_every_real_token_counts_equally(tiny: FrozenTextEncoder) -> None:
    config = dataclasses.replace(FAST, n_metrics=1, hidden=tiny.dim, token_selection=False)
    model = RouteT2IModel(config, (1.0,)).eval()
    assert model.expert_embeddings is None
    states, mask = tiny.token_states(["a cat", "a big red dog on the old river"])
    _, weights = model.select_tokens(states, mask)
    torch.testing.assert_close(weights[:, 0], mask.float() / mask.sum(1, keepdim=True))


def test_dual_gate_contrasts_a_negative_branch(tiny: FrozenTextEncoder) -> None:
    states, mask = tiny.token_states(["a red boat on the river", "the moon"])
    dual_config = dataclasses.replace(FAST, n_metrics=1, hidden=tiny.dim)
    dual = RouteT2IModel(dual_config, (1.0,)).eval()
    single = RouteT2IModel(dataclasses.replace(dual_config, dual_gate=False), (1.0,)).eval()
    assert dual.projections.shape[0] == 2 and single.projections.shape[0] == 1
    with torch.no_grad():
        before = dual(states, mask)
        dual.projections[1].zero_()  # silence the negative branch: sigmoid(T+ - 0)
        silenced = dual(states, mask)
        single.load_state_dict({**dual.state_dict(), "projections": dual.projections[:1]})
        assert not torch.allclose(before, silenced)
        torch.testing.assert_close(single(states, mask), silenced)


def test_single_metric_ablation_predicts_prs_directly(
    tiny: FrozenTextEncoder, train: PairTable
) -> None:
    router = RouteT2IRouter(
        dataclasses.replace(FAST, epochs=3), encoder=tiny, multi_metric=False, verbose=True
    )
    router.fit(train)
    prompts = ["a cat", "a dragon"]
    assert router.predict_metrics(prompts).shape == (2, 1)
    np.testing.assert_allclose(router.predict_metrics(prompts)[:, 0], router.predict_prs(prompts))
    assert router.name == "routet2i-no-multi-metric"


def test_training_lowers_the_loss(tiny: FrozenTextEncoder, train: PairTable) -> None:
    router = RouteT2IRouter(FAST, encoder=tiny)
    states, mask = tiny.token_states(train.prompts)
    config = dataclasses.replace(FAST, n_metrics=3, hidden=tiny.dim)
    torch.manual_seed(0)
    model = RouteT2IModel(config, (1 / 3, 1 / 3, 1 / 3))
    distance, prs = PRSParams.fit(train).labels(train)
    losses = list(
        router._train(
            model,
            states,
            mask,
            torch.tensor(distance, dtype=torch.float32),
            torch.tensor(prs[:, None], dtype=torch.float32),
            torch.Generator().manual_seed(0),
        )
    )
    assert len(losses) == FAST.epochs
    assert losses[-1] < 0.8 * losses[0]


def test_learns_the_planted_rule_on_held_out_prompts(
    router: RouteT2IRouter, held_out: PairTable
) -> None:
    hard = np.array([KEYWORD in p.split() for p in held_out.prompts])
    assert auc(router.predict_prs(held_out.prompts), hard) > 0.9
    # The per-metric heads learn it too, not only their weighted sum.
    distance = router.predict_metrics(held_out.prompts)
    assert all(auc(distance[:, i], hard) > 0.8 for i in range(len(METRICS)))


def test_single_score_data_trains(tiny: FrozenTextEncoder, train: PairTable) -> None:
    single = PairTable(train.prompts, train.edge[:, :1], train.cloud[:, :1], ("rating",))
    router = RouteT2IRouter(FAST, encoder=tiny, ensemble=2)
    router.fit(single)
    held = planted_table(60, seed=3)
    hard = np.array([KEYWORD in p.split() for p in held.prompts])
    assert router.predict_metrics(held.prompts).shape == (60, 1)
    assert auc(router.predict_prs(held.prompts), hard) > 0.9


def test_save_and_load_give_the_same_router(
    router: RouteT2IRouter, tiny: FrozenTextEncoder, held_out: PairTable, tmp_path: Path
) -> None:
    save_router(router, tmp_path / "v1")
    assert (tmp_path / "v1" / "model.safetensors").is_file()
    assert (tmp_path / "v1" / "config.json").is_file()
    loaded = load_router(tmp_path / "v1")  # finds the tiny encoder through its config
    assert isinstance(loaded, RouteT2IRouter)
    np.testing.assert_array_equal(
        loaded.predict_prs(held_out.prompts), router.predict_prs(held_out.prompts)
    )
    np.testing.assert_array_equal(
        loaded.predict_metrics(held_out.prompts), router.predict_metrics(held_out.prompts)
    )
    assert loaded.version == router.version
    assert loaded.prs_params == router.prs_params and loaded.metrics == router.metrics


def test_version_follows_the_weights(router: RouteT2IRouter, tiny: FrozenTextEncoder) -> None:
    copy = RouteT2IRouter(router.config, encoder=tiny)
    copy.tier_params, copy.metrics = router.tier_params, router.metrics
    copy.model = RouteT2IEnsemble(router.config, router.tier_params[0].weights)
    copy.model.load_state_dict(router._fitted().state_dict())
    assert copy.version == router.version
    with torch.no_grad():
        copy.model.models()[0].head_bias.add_(1e-3)
    assert copy.version != router.version
    assert router.version.startswith("routet2i-")


def test_same_seed_same_router(tiny: FrozenTextEncoder, train: PairTable) -> None:
    config = dataclasses.replace(FAST, epochs=2)
    first, second = RouteT2IRouter(config, encoder=tiny), RouteT2IRouter(config, encoder=tiny)
    first.fit(train)
    second.fit(train)
    assert first.version == second.version


def test_unfitted_router_says_so(tiny: FrozenTextEncoder) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        RouteT2IRouter(FAST, encoder=tiny).predict_prs(["a cat"])


def test_calibrated_threshold_sends_rho_to_the_cloud(
    router: RouteT2IRouter, held_out: PairTable
) -> None:
    prs = router.predict_prs(held_out.prompts)
    for rho in (0.1, 0.3, 0.5):
        alpha = calibrate_alpha(prs.tolist(), rho)
        share = route_to_cloud(prs, alpha).mean()
        assert alpha <= 0.5
        assert rho - 1 / len(prs) - 1e-9 <= share <= rho or alpha == 0.5


def test_real_minilm_router_runs_end_to_end(tmp_path: Path) -> None:
    table = planted_table(12, seed=4)
    router = RouteT2IRouter(dataclasses.replace(FAST, epochs=2, batch_size=4))
    router.fit(table)
    assert router.config.hidden == 384 and router.config.encoder is None
    prs = router.predict_prs(table.prompts[:3])
    assert prs.shape == (3,) and np.all((prs > 0) & (prs < 1))
    save_router(router, tmp_path)
    np.testing.assert_array_equal(load_pair_router(tmp_path).predict_prs(table.prompts[:3]), prs)


def test_router_on_the_edge_pipelines_clip_text_encoder(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The encoder RouteT2I was designed around: the CLIP text encoder that conditions the
    images, named by the pipeline folder; a saved router finds it again through its config."""
    table = planted_table(16, seed=5)
    router = RouteT2IRouter(dataclasses.replace(FAST, epochs=2, encoder=str(tiny_models["edge"])))
    router.fit(table)
    assert router.config.hidden == router.encoder.dim == 32
    prs = router.predict_prs(table.prompts[:4])
    save_router(router, tmp_path)
    loaded = load_router(tmp_path)
    assert isinstance(loaded, RouteT2IRouter) and loaded.config.encoder == str(tiny_models["edge"])
    np.testing.assert_array_equal(loaded.predict_prs(table.prompts[:4]), prs)


def test_pairwise_rank_loss_reads_only_the_order() -> None:
    target = torch.tensor([0.9, 0.5, 0.1, 0.5])
    right = torch.tensor([0.7, 0.5, 0.3, 0.5])
    wrong = torch.tensor([0.3, 0.5, 0.7, 0.5])
    assert pairwise_rank_loss(right, target) < pairwise_rank_loss(wrong, target)
    # A monotone shift of the predictions keeps the order; ties in the target add nothing.
    shifted = pairwise_rank_loss(torch.tensor([0.8, 0.6, 0.4, 0.6]), target)
    assert shifted < pairwise_rank_loss(right, target)
    assert float(pairwise_rank_loss(right, torch.full((4,), 0.5))) == 0.0


def test_shared_expert_and_rank_loss_train_and_reload(
    tiny: FrozenTextEncoder, train: PairTable, held_out: PairTable, tmp_path: Path
) -> None:
    config = dataclasses.replace(FAST, shared_expert=True, rank_loss=1.0, ensemble=2)
    router = RouteT2IRouter(config, encoder=tiny)
    router.fit(train)
    assert all(m.shared is not None for m in router._fitted().models())
    hard = np.array([KEYWORD in p.split() for p in held_out.prompts])
    assert auc(router.predict_prs(held_out.prompts), hard) > 0.9
    save_router(router, tmp_path / "v")
    loaded = load_router(tmp_path / "v")
    assert isinstance(loaded, RouteT2IRouter) and loaded.config == router.config
    np.testing.assert_array_equal(
        loaded.predict_prs(held_out.prompts), router.predict_prs(held_out.prompts)
    )
    off = RouteT2IRouter(dataclasses.replace(config, shared_expert=False), encoder=tiny)
    off.fit(train)
    assert all(m.shared is None for m in off._fitted().models())


def test_the_encoder_layer_is_recorded_and_checked_on_load(
    router: RouteT2IRouter, tiny: FrozenTextEncoder, tmp_path: Path
) -> None:
    assert router.config.encoder_layer == tiny.layer
    save_router(router, tmp_path / "v1")
    other = FrozenTextEncoder(tiny.path, layer=1)
    with pytest.raises(ValueError, match="encoder layer"):
        RouteT2IRouter.load(tmp_path / "v1", encoder=other)
