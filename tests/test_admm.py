"""The closed-form ADMM updates against brute-force minimisation, and the blocked solves against one process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import optimize

from admm_jobs.trainer import admm
from admm_jobs.trainer.loop import (
    AdmmTrainer,
    Hyperparameters,
    LocalBackend,
    NumericalFailure,
    check_finite,
    cut_blocks,
)

RNG = np.random.default_rng(1234)


def test_preactivation_update_is_the_elementwise_minimiser():
    a = RNG.normal(size=400).astype(np.float32)
    m = RNG.normal(size=400).astype(np.float32) * 2
    beta, gamma = 1.7, 3.1
    z = admm.update_preactivation(a, m, beta, gamma)
    objective = lambda zi, ai, mi: gamma * (ai - max(zi, 0.0)) ** 2 + beta * (zi - mi) ** 2
    for zi, ai, mi in zip(z, a, m):
        grid = np.linspace(-8, 8, 32001)
        brute = grid[np.argmin(gamma * (ai - np.maximum(grid, 0)) ** 2 + beta * (grid - mi) ** 2)]
        assert objective(zi, ai, mi) <= objective(brute, ai, mi) + 1e-5


def test_preactivation_update_takes_the_cheaper_branch_at_extreme_ratios():
    grid = np.linspace(-6, 6, 241, dtype=np.float32)
    a, m = (values.ravel() for values in np.meshgrid(grid, grid))
    for beta, gamma in [(1.0, 10.0), (0.3, 10.0), (10.0, 0.1), (1.0, 1.0)]:
        z = admm.update_preactivation(a, m, beta, gamma)
        cost = gamma * (a - np.maximum(z, 0)) ** 2 + beta * (z - m) ** 2
        branches = [np.maximum((gamma * a + beta * m) / (gamma + beta), 0), np.minimum(m, 0)]
        best = np.min([gamma * (a - np.maximum(b, 0)) ** 2 + beta * (b - m) ** 2 for b in branches], axis=0)
        np.testing.assert_allclose(cost, best, rtol=1e-5, atol=1e-4)


def test_hidden_placement_rounds_lower_the_layer_local_objective():
    """Each round of a/z alternation is exact in its block, so the joint objective never rises;
    one round is the classic activation-then-preactivation step."""
    n, width, out = 200, 12, 6
    z_forward, m = RNG.normal(size=(n, width)).astype(np.float32), RNG.normal(size=(n, width)).astype(np.float32)
    target = RNG.normal(size=(n, out)).astype(np.float32)
    weights = RNG.normal(size=(out, width + 1)).astype(np.float32)
    beta_next, beta, gamma = 0.7, 1.0, 2.0
    operator = admm.activation_operator(weights, beta_next, gamma)

    def objective(a, z):
        return (beta_next * ((target - admm.affine(weights, a)) ** 2).sum()
                + gamma * ((a - admm.relu(z)) ** 2).sum() + beta * ((z - m) ** 2).sum())

    classic_a = admm.update_activation(z_forward, target, weights, operator)
    classic = (classic_a, admm.update_preactivation(classic_a, m, beta, gamma))
    one = admm.place_hidden(z_forward, m, target, weights, operator, beta, gamma, 1)
    for got, wanted in zip(one, classic):
        np.testing.assert_allclose(got, wanted, rtol=1e-4, atol=1e-4)
    values = [objective(*admm.place_hidden(z_forward, m, target, weights, operator, beta, gamma, rounds))
              for rounds in (1, 2, 3, 6)]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(values, values[1:]))
    assert values[-1] < 0.99 * values[0]


def test_hidden_placement_is_the_same_tile_by_tile():
    """Rows are independent: placing them 64 at a time (a ragged last tile included) changes nothing."""
    n, width, out = 300, 24, 16
    z_forward, m = RNG.normal(size=(n, width)).astype(np.float32), RNG.normal(size=(n, width)).astype(np.float32)
    target = RNG.normal(size=(n, out)).astype(np.float32)
    weights = RNG.normal(size=(out, width + 1)).astype(np.float32)
    operator = admm.activation_operator(weights, 0.7, 2.0)
    whole = admm.place_hidden(z_forward, m, target, weights, operator, 1.0, 2.0, 4, tile_rows=n)
    tiled = admm.place_hidden(z_forward, m, target, weights, operator, 1.0, 2.0, 4, tile_rows=64)
    for got, wanted in zip(tiled, whole):
        np.testing.assert_allclose(got, wanted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width, out, low_rank", [(7, 5, False), (16, 3, True)])
def test_activation_update_solves_its_least_squares_problem(width, out, low_rank):
    """Both forms of the operator (dense inverse; Woodbury's low rank for a narrow next layer) solve it exactly."""
    n = 50
    z, z_next = RNG.normal(size=(n, width)), RNG.normal(size=(n, out))
    weights = RNG.normal(size=(out, width + 1))
    beta, gamma = 2.0, 0.5
    operator = admm.activation_operator(weights, beta, gamma)
    assert (operator.correction is not None) == low_rank
    a = admm.update_activation(z.astype(np.float32), z_next.astype(np.float32), weights.astype(np.float32), operator)
    # stacked least squares: sqrt(beta) (W a + b - z_next) and sqrt(gamma) (a - relu(z)), per sample
    W, b = weights[:, :-1], weights[:, -1]
    stacked = np.vstack([np.sqrt(beta) * W, np.sqrt(gamma) * np.eye(width)])
    for i in range(n):
        rhs = np.concatenate([np.sqrt(beta) * (z_next[i] - b), np.sqrt(gamma) * np.maximum(z[i], 0)])
        expected = np.linalg.lstsq(stacked, rhs, rcond=None)[0]
        np.testing.assert_allclose(a[i], expected, rtol=1e-4, atol=1e-5)


def test_weight_solve_matches_direct_ridge_least_squares():
    n, width, out, ridge = 80, 6, 4, 0.3
    a_prev, targets = RNG.normal(size=(n, width)), RNG.normal(size=(n, out))
    W = admm.solve_weights(admm.layer_cross(targets, a_prev), admm.layer_gram(a_prev), ridge)
    A = np.hstack([a_prev, np.ones((n, 1))])
    stacked = np.vstack([A, np.sqrt(ridge) * np.eye(width + 1)])
    for row in range(out):
        expected = np.linalg.lstsq(stacked, np.concatenate([targets[:, row], np.zeros(width + 1)]), rcond=None)[0]
        np.testing.assert_allclose(W[row], expected, rtol=1e-4, atol=1e-5)


def test_block_statistics_sum_to_the_full_data_statistics():
    a_prev, z = RNG.normal(size=(90, 5)).astype(np.float32), RNG.normal(size=(90, 3)).astype(np.float32)
    parts = np.array_split(np.arange(90), 4)
    np.testing.assert_allclose(sum(admm.layer_cross(z[p], a_prev[p]) for p in parts), admm.layer_cross(z, a_prev), rtol=1e-5)
    np.testing.assert_allclose(sum(admm.layer_gram(a_prev[p]) for p in parts), admm.layer_gram(a_prev), rtol=1e-5)


@pytest.mark.parametrize("loss", admm.LOSSES)
def test_output_update_is_the_exact_prox_of_the_loss(loss):
    n, classes, beta = 12, 4, 1.5
    labels = RNG.integers(0, classes, size=n)
    targets = admm.one_hot(labels, classes)
    v = RNG.normal(size=(n, classes)).astype(np.float32)
    z = admm.OUTPUT_PROX[loss](targets, v, beta)

    def objective(zi, i):
        return admm.sample_losses(loss, zi[None, :], labels[i:i + 1])[0] + beta * np.sum((zi - v[i]) ** 2)

    for i in range(n):
        brute = optimize.minimize(lambda w: objective(w, i), v[i].astype(np.float64), method="Nelder-Mead",
                                  options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 50000, "maxfev": 50000}).x
        value = objective(z[i].astype(np.float64), i)
        assert value <= objective(brute, i) + 1e-5
        # no nearby point is better either (the objective is strongly convex, so this pins z down)
        for step in 1e-3 * RNG.normal(size=(50, classes)):
            assert value <= objective(z[i] + step, i) + 1e-6


def test_multiplier_update_is_the_scaled_constraint_residual():
    multiplier, z, m = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    np.testing.assert_allclose(admm.update_multiplier(multiplier, z, m), multiplier + z - m, rtol=1e-6)
    np.testing.assert_allclose(admm.update_multiplier(multiplier, z, m, 1.6), multiplier + 1.6 * (z - m), rtol=1e-6)


def test_extrapolation_and_input_mean_folding():
    new, previous = [RNG.normal(size=(3, 5))], [RNG.normal(size=(3, 5))]
    np.testing.assert_allclose(admm.extrapolate(new, previous, 0.9)[0], new[0] + 0.9 * (new[0] - previous[0]), rtol=1e-6)
    np.testing.assert_array_equal(admm.extrapolate(new, None, 0.9)[0], new[0])
    weights = [RNG.normal(size=(4, 6)).astype(np.float32), RNG.normal(size=(2, 5)).astype(np.float32)]
    x, mean = RNG.random(size=(7, 5)).astype(np.float32), RNG.random(size=5).astype(np.float32)
    np.testing.assert_allclose(admm.forward(admm.fold_input_mean(weights, mean), x),
                               admm.forward(weights, x - mean), rtol=1e-5, atol=1e-5)


def _blocks(pixels, labels, count, chunk_rows=16):
    return cut_blocks(pixels, labels, {"test": (pixels[:40], labels[:40])}, count, chunk_rows)


def _toy_problem(n=240, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centers = rng.integers(0, 256, size=(classes, 20))
    pixels = np.clip(centers[labels] + rng.normal(0, 40, size=(n, 20)), 0, 255).astype(np.uint8)
    return pixels, labels


@pytest.mark.parametrize("epochs", [1, 4])
def test_the_weights_do_not_depend_on_how_the_rows_are_cut_into_blocks(epochs):
    """Statistics are summed chunk by chunk along one fixed tree (``reduction``): one block, five
    blocks or seven uneven ones give bit-identical weights and scores."""
    pixels, labels = _toy_problem()
    hp = Hyperparameters(layer_sizes=(20, 16, 12, 3), epochs=epochs, warmup_epochs=1, patience=0)
    assert epochs == 1 or hp.warmup_epochs < epochs  # multipliers move in the longer run
    one = AdmmTrainer(hp, LocalBackend(_blocks(pixels, labels, 1))).fit()
    for count in (5, 7):
        many = AdmmTrainer(hp, LocalBackend(_blocks(pixels, labels, count))).fit()
        for w_one, w_many in zip(one.weights, many.weights):
            np.testing.assert_array_equal(w_many, w_one)
        assert [r.metrics for r in many.history] == [r.metrics for r in one.history]
    # the chunk size is what the sums depend on: another one moves the last bits
    other = AdmmTrainer(hp, LocalBackend(_blocks(pixels, labels, 1, chunk_rows=24))).fit()
    assert any(not np.array_equal(w_other, w_one) for w_other, w_one in zip(other.weights, one.weights))


def _dense_recipe(pixels, labels, hp, iterations):
    """The training recipe written out on the whole data set at once, from the update primitives only:
    restart a, z from the forward pass, backward sweep of solves, multiplier steps, extrapolation."""
    x = pixels.astype(np.float64) / 255
    a0 = (x - x.mean(axis=0)).astype(np.float32)
    targets, last = admm.one_hot(labels, hp.layer_sizes[-1]), hp.layers
    weights = admm.he_initial_weights(list(hp.layer_sizes), np.random.default_rng(hp.seed))
    hidden = a0
    for weight in weights[:-1]:
        hidden = admm.relu(admm.affine(weight, hidden))
    weights[-1] = admm.solve_weights(admm.layer_cross(admm.fit_targets(hp.loss, targets), hidden),
                                     admm.layer_gram(hidden), hp.init_ridge)
    multipliers = [np.zeros((len(labels), size), np.float32) for size in hp.layer_sizes[1:]]
    previous = None
    for iteration in range(1, iterations + 1):
        inputs, forward_z = [a0], []
        for weight in weights:
            forward_z.append(admm.affine(weight, inputs[-1]))
            inputs.append(admm.relu(forward_z[-1]))

        def solve(layer, target):
            gram = admm.layer_gram(inputs[layer - 1])
            return admm.solve_weights(admm.layer_cross(target, inputs[layer - 1]), gram, hp.ridge_of(layer, len(labels)))

        new = list(weights)
        new[-1] = solve(last, forward_z[-1] + multipliers[-1])
        m = admm.affine(new[-1], inputs[last - 1])
        z_next = admm.OUTPUT_PROX[hp.loss](targets, m - multipliers[-1], hp.beta_output)
        multipliers[-1] += hp.multiplier_step * (z_next - m)
        for layer in range(last - 1, 0, -1):
            operator = admm.activation_operator(new[layer], hp.beta_of(layer + 1), hp.gamma)
            z = forward_z[layer - 1]
            for _ in range(hp.target_rounds if layer == last - 1 else hp.inner_target_rounds):
                a = admm.update_activation(z, z_next + multipliers[layer], new[layer], operator)
                z = admm.update_preactivation(a, forward_z[layer - 1] - multipliers[layer - 1], hp.beta_of(layer),
                                              hp.gamma)
            new[layer - 1] = solve(layer, z + multipliers[layer - 1])
            if iteration > hp.warmup_epochs:  # warm-up freezes the hidden multipliers only
                multipliers[layer - 1] += hp.multiplier_step * (z - admm.affine(new[layer - 1], inputs[layer - 1]))
            z_next = z
        weights, previous = admm.extrapolate(new, previous, hp.extrapolation_at(iteration)), new
    return admm.fold_input_mean(weights, (x.mean(axis=0)).astype(np.float32))


@pytest.mark.parametrize("loss, layer_sizes, warmup, rounds, inner_rounds, step", [
    ("squared_hinge", (20, 16, 12, 3), 0, 1, 1, 1.6),
    ("least_squares", (20, 16, 12, 3), 0, 1, 1, 1.6),
    ("squared_hinge", (20, 16, 3), 0, 1, 1, 1.6),
    ("squared_hinge", (20, 16, 12, 3), 2, 1, 1, 1.6),
    ("squared_hinge", (20, 16, 12, 3), 0, 3, 3, 1.6),
    ("squared_hinge", (20, 16, 12, 3), 0, 3, 3, 1.0),
    ("squared_hinge", (20, 16, 12, 8, 3), 0, 4, 2, 1.6)])
def test_the_pass_structure_computes_the_dense_recipe(loss, layer_sizes, warmup, rounds, inner_rounds, step):
    """The trainer splits an iteration into passes and reductions; the result is the recipe's."""
    pixels, labels = _toy_problem()
    hp = Hyperparameters(layer_sizes=layer_sizes, loss=loss, epochs=9, extrapolation_epochs=2, warmup_epochs=warmup,
                         patience=0, target_rounds=rounds, inner_target_rounds=inner_rounds, multiplier_step=step)
    result = AdmmTrainer(hp, LocalBackend(_blocks(pixels, labels, 1))).fit()
    best_weights_of_epoch = result.best_epoch
    expected = _dense_recipe(pixels, labels, hp, best_weights_of_epoch)
    assert best_weights_of_epoch > hp.extrapolation_epochs  # both extrapolation phases are covered
    for actual, wanted in zip(result.weights, expected):
        np.testing.assert_allclose(actual, wanted, rtol=0, atol=1e-3 * np.abs(wanted).max())


def test_training_learns_a_separable_toy_problem():
    pixels, labels = _toy_problem()
    result = AdmmTrainer(Hyperparameters(layer_sizes=(20, 16, 3), epochs=15, patience=0),
                         LocalBackend(_blocks(pixels, labels, 3))).fit()
    accuracies = [r.metrics["train_accuracy"] for r in result.history]
    assert accuracies[-1] > 0.95 and accuracies[-1] >= accuracies[0]
    assert [r.epoch for r in result.history] == list(range(1, 16))
    # the returned weights take raw inputs: the input mean is folded into the first bias
    logits = admm.forward(result.weights, pixels.astype(np.float32) / 255)
    best = result.history[result.best_epoch - 1].metrics["train_accuracy"]
    assert (logits.argmax(axis=1) == labels).mean() == pytest.approx(best)


def test_numerical_failure_names_layer_and_epoch():
    pixels, labels = _toy_problem(n=60)
    blocks = _blocks(pixels, labels, 2)
    blocks[1]["pixels"] = blocks[1]["pixels"].astype(np.float32)
    blocks[1]["pixels"][0, 0] = np.nan  # a corrupt sample poisons the statistics
    with pytest.raises(NumericalFailure, match=r"epoch 0 \(initialisation\).* layer \d+ .*not finite"):
        AdmmTrainer(Hyperparameters(layer_sizes=(20, 8, 3), epochs=2), LocalBackend(blocks)).fit()
    with pytest.raises(NumericalFailure, match=r"epoch 7: residual of layer 2 is inf"):
        check_finite({"residual1": 1.0, "residual2": float("inf")}, 7)


def test_warm_start_begins_from_the_given_network():
    """initial_weights (raw-input layout, as a published Model stores them) replace the random start and
    the output layer's least-squares fit: the first forward pass reproduces the given network's logits."""
    pixels, labels = _toy_problem()
    hp = Hyperparameters(layer_sizes=(20, 16, 3), epochs=15, patience=0)
    trained = AdmmTrainer(hp, LocalBackend(_blocks(pixels, labels, 3))).fit()
    warm = AdmmTrainer(dataclasses.replace(hp, epochs=2), LocalBackend(_blocks(pixels, labels, 3)),
                       initial_weights=trained.weights)
    state = warm._initialise()
    centred = pixels.astype(np.float32) / 255 - state.mean
    np.testing.assert_allclose(admm.forward(state.weights, centred),
                               admm.forward(trained.weights, pixels.astype(np.float32) / 255), rtol=1e-4, atol=1e-4)
    cold = AdmmTrainer(dataclasses.replace(hp, epochs=2), LocalBackend(_blocks(pixels, labels, 3))).fit()
    warm_result = warm.fit()
    assert warm_result.history[0].metrics["train_loss"] < 0.5 * cold.history[0].metrics["train_loss"]
    with pytest.raises(ValueError, match=r"initial weights have shapes"):
        AdmmTrainer(Hyperparameters(layer_sizes=(20, 8, 3)), LocalBackend([]), initial_weights=trained.weights)
