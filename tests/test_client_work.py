"""FedRecon client step and round: invariants, and equality with an independent numpy computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedrecon.core.algorithm import FedRecon
from fedrecon.core.batching import ClientExamples, pack_clients
from fedrecon.core.client_work import ClientUpdate, client_update
from fedrecon.core.config import ClientWeighting, FedReconConfig, OptimizerSpec
from fedrecon.core.matrix_factorization import MatrixFactorization

NUM_ITEMS, FACTORS, BATCH = 12, 3, 2


def _clients() -> list[ClientExamples]:
    rng = np.random.default_rng(3)
    clients = []
    for n in (9, 4, 6):
        x = rng.choice(NUM_ITEMS, size=n, replace=False).astype(np.int32)
        clients.append(ClientExamples(x=x, y=rng.integers(1, 6, n).astype(np.float32)))
    return clients


def _config(**changes: object) -> FedReconConfig:
    base = FedReconConfig(reconstruction_optimizer=OptimizerSpec("sgd", 0.1),
                          client_optimizer=OptimizerSpec("sgd", 0.2),
                          server_optimizer=OptimizerSpec("sgd", 1.0),
                          recon_epochs=2, recon_steps_max=3, post_recon_epochs=2, post_recon_steps_max=3)
    return dataclasses.replace(base, **changes)


def _numpy_round(items: np.ndarray, clients: list[ClientExamples], user_inits: list[np.ndarray],
                 config: FedReconConfig) -> np.ndarray:
    """FedRecon for matrix factorization written out by hand, one client and one example at a time."""
    lr_r = config.reconstruction_optimizer.learning_rate
    lr_c = config.client_optimizer.learning_rate
    weighted_sum = np.zeros_like(items, dtype=np.float64)
    total = 0.0
    for client, u0 in zip(clients, user_inits, strict=True):
        batches = [list(range(s, min(s + BATCH, len(client)))) for s in range(0, len(client), BATCH)]
        recon = (batches[0::2] * config.recon_epochs)[: config.recon_steps_max]
        post = (batches[1::2] * config.post_recon_epochs)[: config.post_recon_steps_max]
        u = u0.astype(np.float64).copy()
        v = items.astype(np.float64)
        for batch in recon:  # item factors frozen
            grad = 2.0 * config.reconstruction_l2 * u
            for e in batch:
                i, y = client.x[e], client.y[e]
                grad += 2.0 * (v[i] @ u - y) * v[i] / len(batch)
            u -= lr_r * grad
        v_client = v.copy()
        seen = 0
        for batch in post:  # user factors frozen
            grad = np.zeros_like(v_client)
            for e in batch:
                i, y = client.x[e], client.y[e]
                grad[i] += 2.0 * (v_client[i] @ u - y) * u / len(batch)
            v_client -= lr_c * grad
            seen += len(batch)
        weight = float(seen) if config.client_weighting == ClientWeighting.NUM_EXAMPLES else 1.0
        weighted_sum += weight * (v_client - v)
        total += weight
    return items + config.server_optimizer.learning_rate * weighted_sum / total


def _engine_round(config: FedReconConfig, clients: list[ClientExamples]) -> tuple[np.ndarray, np.ndarray,
                                                                                    list[np.ndarray]]:
    model = MatrixFactorization(NUM_ITEMS, FACTORS)
    algorithm = FedRecon(model, config)
    state = algorithm.initial_state(seed=11)
    rngs = [np.random.default_rng(100 + c) for c in range(len(clients))]
    packed = pack_clients(model, clients, config, batch_size=BATCH, local_rngs=rngs)
    result = algorithm.client_step.train_clients(state.globals, packed)
    aggregate = algorithm.new_aggregate(max_clients=len(clients), batch_size=BATCH)
    aggregate.fold(result.deltas, result.weights)
    assert aggregate.report.updates_clipped == 0 and aggregate.report.weights_capped == 0  # honest: untouched
    new_state = algorithm.server_update(state, aggregate)
    return state.globals[0], new_state.globals[0], [packed.locals[0][c] for c in range(len(clients))]


@pytest.mark.parametrize(("weighting", "l2"), [(ClientWeighting.NUM_EXAMPLES, 0.0),
                                               (ClientWeighting.UNIFORM, 0.0),
                                               (ClientWeighting.NUM_EXAMPLES, 0.5)])
def test_one_round_equals_hand_written_numpy(weighting: ClientWeighting, l2: float) -> None:
    config = _config(client_weighting=weighting, reconstruction_l2=l2)
    clients = _clients()
    before, after, inits = _engine_round(config, clients)
    expected = _numpy_round(before, clients, inits, config)
    assert np.abs(after - before).max() > 1e-3  # the round really moved the model
    np.testing.assert_allclose(after, expected, atol=2e-6)


def test_server_momentum_round_matches_formula() -> None:
    config = _config(server_optimizer=OptimizerSpec("momentum", 0.7, momentum=0.9))
    clients = _clients()
    before, after, inits = _engine_round(config, clients)
    mean_delta = _numpy_round(before, clients, inits, _config()) - before  # server SGD 1.0 = mean delta
    np.testing.assert_allclose(after, before + 0.7 * mean_delta, atol=2e-6)


def test_upload_holds_only_global_trainable_variables() -> None:
    model = MatrixFactorization(NUM_ITEMS, FACTORS, use_biases=True)
    algorithm = FedRecon(model, _config())
    globals_ = model.initial_globals(0)
    update = client_update(algorithm.client_step, globals_, _clients()[0], batch_size=BATCH,
                           rng=np.random.default_rng(0))
    assert [f.name for f in dataclasses.fields(ClientUpdate)] == ["delta", "weight", "metrics"]
    assert [d.shape for d in update.delta] == [globals_[i].shape for i in model.global_trainable]
    assert {v.name for v in model.local_variables} == {"user_embedding", "user_bias"}
    assert not {v.name for v in model.local_variables} & {v.name for v in model.global_variables}
    # 9 examples in batches of 2: odd batches 1 and 3 (2 examples each), 2 epochs capped at 3 steps → 6
    assert update.weight == 6.0
    assert np.abs(update.delta[0]).sum() > 0


def test_locals_are_fresh_every_run_and_the_step_keeps_no_state() -> None:
    model = MatrixFactorization(NUM_ITEMS, FACTORS)
    algorithm = FedRecon(model, _config())
    globals_ = model.initial_globals(0)
    client = _clients()[0]
    first = client_update(algorithm.client_step, globals_, client, batch_size=BATCH,
                          rng=np.random.default_rng(5))
    client_update(algorithm.client_step, globals_, _clients()[1], batch_size=BATCH,
                  rng=np.random.default_rng(6))
    again = client_update(algorithm.client_step, globals_, client, batch_size=BATCH,
                          rng=np.random.default_rng(5))
    other_init = client_update(algorithm.client_step, globals_, client, batch_size=BATCH,
                               rng=np.random.default_rng(8))
    # Same fresh initialisation → identical update, whatever ran in between (no carried-over locals).
    np.testing.assert_array_equal(first.delta[0], again.delta[0])
    # A different fresh initialisation changes the reconstruction and hence the update.
    assert np.abs(first.delta[0] - other_init.delta[0]).max() > 0


def test_reconstruction_and_training_batches_are_disjoint() -> None:
    model = MatrixFactorization(NUM_ITEMS, FACTORS)
    clients = _clients()
    packed = pack_clients(model, clients, _config(recon_steps_max=None, post_recon_steps_max=None),
                          batch_size=BATCH, local_rngs=[np.random.default_rng(c) for c in range(3)])
    for c in range(len(clients)):
        flat = packed.views.x[c]
        recon = packed.reconstruction
        post = packed.post_reconstruction
        recon_ids = set(recon.x[:, c][recon.mask[:, c] > 0].tolist())
        post_ids = set(post.x[:, c][post.mask[:, c] > 0].tolist())
        assert recon_ids and post_ids
        assert not recon_ids & post_ids
        assert recon_ids | post_ids == set(flat.tolist())


def test_non_finite_update_gets_weight_zero_and_does_not_touch_the_model() -> None:
    model = MatrixFactorization(NUM_ITEMS, FACTORS)
    algorithm = FedRecon(model, _config())
    state = algorithm.initial_state(seed=1)
    clients = _clients()
    bad = ClientExamples(x=clients[1].x, y=np.full(len(clients[1]), np.inf, np.float32))
    packed = pack_clients(model, [clients[0], bad], algorithm.config, batch_size=BATCH,
                          local_rngs=[np.random.default_rng(0), np.random.default_rng(1)])
    result = algorithm.client_step.train(state.globals, packed)
    assert result.finite.tolist() == [True, False]
    assert result.weights[1] == 0.0 and result.weights[0] > 0
    assert all(np.isfinite(s).all() for s in result.weighted_delta_sum)
    # Only the good client contributes: the bad one's items outside the good one's are untouched.
    only_bad = sorted(set(bad.x.tolist()) - set(clients[0].x.tolist()))
    assert only_bad and np.all(result.weighted_delta_sum[0][only_bad] == 0)


def test_a_client_s_float64_sum_of_squares_is_finite_exactly_when_its_update_is() -> None:
    """The client step tells finite updates by their float64 sum of squares (no pass of its own): the
    largest float32 squared stays finite in float64, and Inf or NaN anywhere in a client's rows makes its
    sum non-finite. Rows: client 0 huge but finite, client 1 one Inf, client 2 one NaN, client 3 zeros."""
    import tensorflow as tf

    from fedrecon.core.client_work import _per_client_squares

    big = np.finfo(np.float32).max
    rows = np.array([[big, -big, big], [1.0, 2.0, 3.0], [1.0, np.inf, 0.0], [np.nan, 0.0, 0.0],
                     [0.0, 0.0, 0.0]], np.float32)
    owner = tf.constant([0, 0, 1, 2, 3])
    squares = _per_client_squares(tf.constant(rows), owner, tf.constant(4)).numpy()
    assert squares.dtype == np.float64
    assert np.isfinite(squares).tolist() == [True, False, False, True]
    assert squares[0] == 3 * float(big) ** 2 + 14.0 and squares[3] == 0.0


def test_jointly_trained_locals_still_never_leave() -> None:
    model = MatrixFactorization(NUM_ITEMS, FACTORS)
    algorithm = FedRecon(model, _config(jointly_train_variables=True))
    update = client_update(algorithm.client_step, model.initial_globals(0), _clients()[0],
                           batch_size=BATCH, rng=np.random.default_rng(0))
    assert len(update.delta) == 1 and update.delta[0].shape == (NUM_ITEMS, FACTORS)


def test_config_round_trips_through_a_dict() -> None:
    config = _config(server_optimizer=OptimizerSpec("yogi", 0.01, epsilon=1e-3), reconstruction_l2=0.1,
                     client_weighting=ClientWeighting.UNIFORM)
    assert FedReconConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="sgd"):
        _config(client_optimizer=OptimizerSpec("adam", 0.1))


def test_personalized_recommendation_for_an_unseen_user() -> None:
    """Reconstruct a new user's factors from its ratings, then rank the items it has not rated."""
    model = MatrixFactorization(NUM_ITEMS, FACTORS, use_biases=True, initial_offset=3.0)
    algorithm = FedRecon(model, _config(recon_epochs=20, recon_steps_max=None))
    globals_ = model.initial_globals(0)
    globals_[1] = np.linspace(-1.0, 1.0, NUM_ITEMS).astype(np.float32)  # item biases: item 11 best
    user = ClientExamples(x=np.array([0, 1, 2, 3], np.int32), y=np.array([5.0, 5.0, 4.0, 5.0], np.float32))
    rng = np.random.default_rng(0)
    fresh = model.initial_locals(np.random.default_rng(0))
    locals_ = algorithm.client_step.reconstruct(globals_, user, batch_size=BATCH, rng=rng)
    assert locals_[1] > fresh[1] + 0.5  # a generous rater: the reconstructed user bias rises
    top = model.recommend(globals_, locals_, k=3, exclude=user.x)
    assert len(top) == 3 and not {i for i, _ in top} & set(user.x.tolist())
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    assert top[0][0] == NUM_ITEMS - 1
    scores = model.score_items(globals_, locals_)
    assert top[0][1] == pytest.approx(float(scores[NUM_ITEMS - 1]))


def test_the_training_loss_of_text_is_per_token_as_evaluation_reports_it() -> None:
    """Training and evaluation report loss in the same unit. For next-word prediction that is the token
    (padding left out): a fresh model scores about ln(classes) per token, where the per-sequence figure
    reported before was several times that."""
    from fedrecon.core.client_work import ClientStep
    from fedrecon.core.nextword import NextWordSizes, nextword_model
    from fedrecon.simulations.text import split_texts, synthetic_texts

    data = split_texts(synthetic_texts(num_users=16, words_per_user=200, vocabulary=30, seed=1),
                       vocab_size=20, seq_len=6, oov_buckets=4, min_words=50, max_examples_per_user=24)
    sizes = NextWordSizes(data.vocabulary.size, seq_len=6, embedding=8, hidden=8, oov_buckets=4)
    model = nextword_model(sizes, "personal_layer", accuracy_excludes=data.vocabulary.accuracy_excludes())
    config = FedReconConfig(reconstruction_optimizer=OptimizerSpec("sgd", 0.5),
                            client_optimizer=OptimizerSpec("sgd", 0.5), post_recon_steps_max=3)
    step = ClientStep(model, config)
    clients = list(data.train.values())[:3]
    packed = pack_clients(model, clients, config, batch_size=4,
                          local_rngs=[np.random.default_rng(i) for i in range(3)])
    result = step.train(model.initial_globals(0), packed)
    post = packed.post_reconstruction
    mask = np.broadcast_to(post.mask[..., None], post.y.shape)
    targets = (mask * (post.y != 0)).sum(axis=tuple(i for i in range(post.y.ndim) if i != 1))
    np.testing.assert_array_equal(result.loss_units, targets)  # every non-padding target, once per step
    assert (result.loss_units > result.post_examples).all()  # tokens, not sequences
    per_token = result.loss_sum / result.loss_units
    np.testing.assert_allclose(per_token, np.log(data.vocabulary.size), atol=0.3)
    device = client_update(step, model.initial_globals(0), clients[0], batch_size=4,
                           rng=np.random.default_rng(0))
    assert device.metrics["loss"] == pytest.approx(np.log(data.vocabulary.size), abs=0.3)
