"""Closed-form ADMM updates for fully-connected ReLU networks.

After Taylor et al., "Training Neural Networks Without Gradients: A Scalable
ADMM Approach" (ICML 2016), with a Lagrange multiplier on every layer's
constraint (in scaled form, u_l) as in dlADMM (Wang et al., KDD 2019).

Notation (samples are rows): ``a_0`` is the (centred) input; for l = 1..L

    z_l = W_l [a_{l-1}, 1]   (pre-activation, a free variable tied by a penalty),
    a_l = relu(z_l)          (activation, a free variable tied by a penalty), l < L,

and the training problem is the augmented Lagrangian

    loss(z_L, y) + sum_l beta_l ||z_l - W_l [a_{l-1}, 1] + u_l||^2
                 + sum_{l<L} gamma_l ||a_l - relu(z_l)||^2 + sum_l beta_l ridge_l ||W_l||^2

(each ridge is relative to its layer's penalty, so the W_l solve is a plain ridge regression).

Every function below is the exact minimiser of that objective in one block
of variables with the others fixed (or the multiplier step), so no gradient
step is taken anywhere. W_l has shape (n_l, n_{l-1} + 1): its last column is
the bias, which multiplies the constant 1 appended to the layer input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

LOSSES = ("squared_hinge", "least_squares", "hinge", "cross_entropy")


def relu(z: np.ndarray) -> np.ndarray:
    """h(z) = max(z, 0)."""
    return np.maximum(z, 0.0)


def affine(weights: np.ndarray, a: np.ndarray) -> np.ndarray:
    """W [a, 1] for every row of a: the layer's pre-activation."""
    return a @ weights[:, :-1].T + weights[:, -1]


def one_hot(labels: np.ndarray, classes: int, dtype=np.float32) -> np.ndarray:
    """Rows e_y of the identity: the least-squares target for class y."""
    targets = np.zeros((labels.shape[0], classes), dtype=dtype)
    targets[np.arange(labels.shape[0]), labels.astype(np.int64)] = 1.0
    return targets


def layer_cross(z: np.ndarray, a_prev: np.ndarray) -> np.ndarray:
    """C = z^T [a, 1] for one block, in float64: summed over blocks it is the full-data C.

    Assembled as [z^T a, z^T 1] so the augmented input is never materialised.
    """
    return np.hstack([(z.T @ a_prev), z.sum(axis=0, dtype=np.float64)[:, None]]).astype(np.float64)


def layer_gram(a_prev: np.ndarray) -> np.ndarray:
    """G = [a, 1]^T [a, 1] = [[a^T a, a^T 1], [1^T a, n]] for one block, in float64."""
    width = a_prev.shape[1]
    gram = np.empty((width + 1, width + 1), dtype=np.float64)
    gram[:width, :width] = a_prev.T @ a_prev
    column_sums = a_prev.sum(axis=0, dtype=np.float64)
    gram[:width, width] = column_sums
    gram[width, :width] = column_sums
    gram[width, width] = a_prev.shape[0]
    return gram


def solve_weights(cross: np.ndarray, gram: np.ndarray, ridge: float) -> np.ndarray:
    """W = argmin ||T - [A, 1] W^T||^2 + ridge ||W||^2 for targets T (rows z_l + u_l).

    With C = T^T [A, 1] and G = [A, 1]^T [A, 1] (``layer_cross``/``layer_gram``
    summed over all samples), the normal equations are W (G + ridge I) = C.
    They are solved with numpy's LAPACK, not scipy's: scipy links its own
    OpenBLAS, whose idle threads spin beside numpy's and slowed every product
    that followed (one MNIST iteration 1.40 s with scipy's Cholesky, 1.03 s
    with this). Returns float32 (n_out, n_in + 1), bias in the last column.
    """
    system = gram + ridge * np.eye(gram.shape[0])
    return np.linalg.solve(system, cross.T).T.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ActivationOperator:
    """The activation update's operator M = (beta W^T W + gamma I)^{-1} (W = W_{l+1} without its bias column),
    kept in the cheaper of two exact forms.

    The update is a = beta (t - b) W M + relu(z) (gamma M). ``pull_matrix`` is beta W M. When W is
    narrow (2 n_out < n_in, as the output layer's W_L), Woodbury's identity gives the low-rank form
    gamma M = I - W^T K W with K = (gamma / beta I + W W^T)^{-1}: ``smooth`` then costs two thin
    products instead of one n_in x n_in product. Otherwise ``smoothing`` holds gamma M densely.
    """

    pull_matrix: np.ndarray  # beta W M, (n_out, n_in)
    smoothing: np.ndarray | None  # gamma M (n_in, n_in), dense form only
    correction: tuple[np.ndarray, np.ndarray] | None  # (W^T, K W), low-rank form only

    def pull(self, target_next: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The z-free part beta (t - b) W M of the activation update."""
        return ((target_next - bias) @ self.pull_matrix).astype(np.float32, copy=False)

    def smooth(self, r: np.ndarray) -> np.ndarray:
        """r (gamma M) for rows r: dense, or r - (r W^T) (K W) in the low-rank form."""
        if self.smoothing is not None:
            return r @ self.smoothing
        left, right = self.correction
        return r - (r @ left) @ right


def activation_operator(next_weights: np.ndarray, beta_next: float, gamma: float) -> ActivationOperator:
    """:class:`ActivationOperator` of the activation update below layer l + 1, W = W_{l+1}, computed in float64."""
    weight = next_weights[:, :-1].astype(np.float64)
    out, width = weight.shape
    if 2 * out < width:
        k_weight = np.linalg.solve(gamma / beta_next * np.eye(out) + weight @ weight.T, weight)  # K W
        weight_inverse = (weight - (weight @ weight.T) @ k_weight) / gamma  # W M = (W - W W^T K W) / gamma
        return ActivationOperator((beta_next * weight_inverse).astype(np.float32), None,
                                  (weight.T.astype(np.float32), k_weight.astype(np.float32)))
    inverse = np.linalg.inv(beta_next * weight.T @ weight + gamma * np.eye(width))
    return ActivationOperator((beta_next * weight @ inverse).astype(np.float32),
                              (gamma * inverse).astype(np.float32), None)


def update_activation(z: np.ndarray, target_next: np.ndarray, next_weights: np.ndarray,
                      operator: ActivationOperator) -> np.ndarray:
    """a_l = argmin_a beta ||t - W a - b||^2 + gamma ||a - relu(z_l)||^2, with t = z_{l+1} + u_{l+1}.

    The minimiser is (beta W^T W + gamma I)^{-1} (beta W^T (t - b) + gamma relu(z_l)) =
    beta (t - b) W M + relu(z_l) (gamma M) in rows, M symmetric (``operator``, :func:`activation_operator`).
    """
    a = operator.smooth(relu(z))
    a += operator.pull(target_next, next_weights[:, -1])
    return a


TILE_ROWS = 1024  # rows placed together: the rounds' elementwise work then stays in cache


def row_tiles(rows: int, tile_rows: int) -> Iterable[slice]:
    """Consecutive ``tile_rows``-row slices covering ``rows`` rows (per-sample work done a tile at a time)."""
    return (slice(start, start + tile_rows) for start in range(0, rows, tile_rows))


def place_hidden(
    z_forward: np.ndarray,
    m: np.ndarray,
    target_next: np.ndarray,
    next_weights: np.ndarray,
    operator: ActivationOperator,
    beta: float,
    gamma: float,
    rounds: int,
    tile_rows: int = TILE_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """(a_l, z_l) by ``rounds`` rounds of exact alternating minimisation of the layer-local problem

        beta_{l+1} ||t - W a - b||^2 + gamma ||a - relu(z)||^2 + beta ||z - m||^2,

    with t = z_{l+1} + u_{l+1}, W, b = W_{l+1} and m = W_l [a_{l-1}, 1] - u_l, starting from the
    network's own pre-activation ``z_forward``. Each round is :func:`update_activation` then
    :func:`update_preactivation`, so the objective never rises; one round is the classic ADMM step,
    more rounds carry the targets further toward the joint minimiser. What does not change between
    rounds is computed once: the z-free part of the a-update and the m-only parts of the z-update
    (:func:`preactivation_rule`). Rows are independent, so they are placed ``tile_rows`` at a time.
    """
    a, z = np.empty_like(z_forward), np.empty_like(z_forward)
    bias = next_weights[:, -1]
    for rows in row_tiles(z_forward.shape[0], tile_rows):
        pull = operator.pull(target_next[rows], bias)
        place = preactivation_rule(m[rows], beta, gamma)
        z_tile = z_forward[rows]
        for _ in range(rounds):
            a_tile = operator.smooth(relu(z_tile))
            a_tile += pull
            z_tile = place(a_tile)
        a[rows], z[rows] = a_tile, z_tile
    return a, z


def preactivation_rule(m: np.ndarray, beta: float, gamma: float) -> Callable[[np.ndarray], np.ndarray]:
    """a -> z = argmin_z gamma (a - relu(z))^2 + beta (z - m)^2, elementwise, with m = W_l [a_{l-1}, 1] - u_l.

    On z >= 0 the minimiser is z+ = max((gamma a + beta m)/(gamma + beta), 0); on z <= 0 it is
    min(m, 0). Comparing the two branch costs in closed form: for m > 0 the z >= 0 branch is never
    worse (its cost gap is -(gamma a + beta m)^2 / (gamma + beta) where z+ > 0, and both give 0
    otherwise); for m <= 0 it wins iff gamma beta / (gamma + beta) (a - m)^2 <= gamma a^2, i.e.
    a >= -k m with k = sqrt(c) / (sqrt(gamma) - sqrt(c)), c = gamma beta / (gamma + beta). Ties take z+.
    The parts that depend on m alone are computed once for repeated placements against the same m
    (:func:`place_hidden`).
    """
    mix = np.float32(gamma / (gamma + beta))
    offset = m * (np.float32(1.0) - mix)
    c = gamma * beta / (gamma + beta)
    threshold = m * np.float32(-np.sqrt(c) / (np.sqrt(gamma) - np.sqrt(c)))
    nonpositive = m <= 0.0  # where m > 0 the z >= 0 branch always wins

    def place(a: np.ndarray) -> np.ndarray:
        # branch selection by multiplying with 0/1 masks: exact, and several times faster than a masked copy
        negative = a < threshold
        negative &= nonpositive
        z = np.multiply(a, mix, dtype=np.float32)
        z += offset
        z *= (z > 0.0) & ~negative
        z += m * negative
        return z

    return place


def update_preactivation(a: np.ndarray, m: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """z = argmin_z gamma (a - relu(z))^2 + beta (z - m)^2, elementwise: :func:`preactivation_rule` applied once."""
    return preactivation_rule(m, beta, gamma)(a)


def prox_least_squares(targets: np.ndarray, v: np.ndarray, beta: float) -> np.ndarray:
    """z_L = argmin_z ||z - y||^2 + beta ||z - v||^2 = (y + beta v) / (1 + beta), with v = W_L [a, 1] - u_L."""
    return ((targets + beta * v) / (1.0 + beta)).astype(np.float32)


def prox_hinge(targets: np.ndarray, v: np.ndarray, beta: float) -> np.ndarray:
    """z_L = argmin_z sum_j hinge(z_j, y_j) + beta ||z - v||^2, elementwise.

    hinge(z, 1) = max(0, 1 - z) and hinge(z, 0) = max(0, z) (Taylor et al.'s
    one-vs-all hinge). Each is convex and piecewise linear with a kink at
    t (1 for the true class, 0 otherwise): the minimiser is the stationary
    point of the linear piece on the correct side of t, else t itself.
    """
    kink = targets
    below = v + np.where(targets > 0, 1.0, 0.0) / (2.0 * beta)  # slope -1 (true class) or 0 below the kink
    above = v - np.where(targets > 0, 0.0, 1.0) / (2.0 * beta)  # slope 0 (true class) or +1 above it
    return np.where(below < kink, below, np.where(above > kink, above, kink)).astype(np.float32)


def signed_targets(targets: np.ndarray) -> np.ndarray:
    """t = +1 for the true class and -1 for the others, from one-hot targets."""
    return (2.0 * targets - 1.0).astype(np.float32)


def prox_squared_hinge(targets: np.ndarray, v: np.ndarray, beta: float) -> np.ndarray:
    """z_L = argmin_z sum_j max(0, 1 - t_j z_j)^2 + beta ||z - v||^2, elementwise, t = +-1 (one-vs-all).

    Where the margin already holds (t_j v_j >= 1) the loss is flat and z_j = v_j; otherwise the
    quadratic (t_j - z_j)^2 + beta (z_j - v_j)^2 is minimised at (t_j + beta v_j) / (1 + beta),
    which still violates the margin, so the branch is consistent.
    """
    signed = signed_targets(targets)
    return np.where(signed * v >= 1.0, v, (signed + beta * v) / (1.0 + beta)).astype(np.float32)


def fit_targets(loss: str, targets: np.ndarray) -> np.ndarray:
    """What the initial least-squares fit of the output layer aims at: +-1 for the squared hinge, else one-hot."""
    return signed_targets(targets) if loss == "squared_hinge" else targets


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def prox_cross_entropy(targets: np.ndarray, v: np.ndarray, beta: float, newton_steps: int = 8) -> np.ndarray:
    """z_L = argmin_z CE(softmax(z), y) + beta ||z - v||^2, per sample.

    The objective is strongly convex in each sample's z (Hessian
    diag(p) - p p^T + 2 beta I); its stationarity condition
    p(z) - y + 2 beta (z - v) = 0 is solved to float precision by Newton's
    method on that 10-dimensional problem, starting from v. This is the
    exact proximal map of the loss, not a step on the network's weights.
    """
    z = v.astype(np.float64)
    target = targets.astype(np.float64)
    eye = np.eye(z.shape[1])
    for _ in range(newton_steps):
        p = softmax(z)
        residual = p - target + 2.0 * beta * (z - v)
        hessian = p[:, :, None] * eye - p[:, :, None] * p[:, None, :] + 2.0 * beta * eye
        z = z - np.linalg.solve(hessian, residual[:, :, None])[:, :, 0]
    return z.astype(np.float32)


OUTPUT_PROX = {
    "squared_hinge": prox_squared_hinge,
    "least_squares": prox_least_squares,
    "hinge": prox_hinge,
    "cross_entropy": prox_cross_entropy,
}


def update_multiplier(multiplier: np.ndarray, z: np.ndarray, m: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Scaled Lagrange step on z_l = W_l [a_{l-1}, 1]: u_l <- u_l + alpha (z_l - W_l [a_{l-1}, 1]) (m is the latter)."""
    return (multiplier + np.float32(step) * (z - m)).astype(np.float32)


def extrapolate(new: list[np.ndarray], previous: list[np.ndarray] | None, theta: float) -> list[np.ndarray]:
    """W = W_new + theta (W_new - W_new_previous): over-relaxation of the weight iterates (none at first)."""
    if previous is None:
        return [w.copy() for w in new]
    return [(w + theta * (w - p)).astype(np.float32) for w, p in zip(new, previous)]


def fold_input_mean(weights: list[np.ndarray], mean: np.ndarray) -> list[np.ndarray]:
    """Weights for uncentred input: W_1 [x - mu, 1] = W_1' [x, 1] with b_1' = b_1 - W_1 mu."""
    folded = [w.copy() for w in weights]
    folded[0][:, -1] -= folded[0][:, :-1] @ mean.astype(np.float32)
    return folded


def centre_input(weights: list[np.ndarray], mean: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`fold_input_mean`: W_1 [x, 1] = W_1' [x - mu, 1] with b_1' = b_1 + W_1 mu."""
    return fold_input_mean(weights, -mean)


def sample_losses(loss: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample value of the output loss at the network's logits."""
    classes = logits.shape[1]
    targets = one_hot(labels, classes)
    if loss == "squared_hinge":
        return (np.maximum(0.0, 1.0 - signed_targets(targets) * logits) ** 2).sum(axis=1)
    if loss == "least_squares":
        return ((logits - targets) ** 2).sum(axis=1)
    if loss == "hinge":
        return np.where(targets > 0, np.maximum(0.0, 1.0 - logits), np.maximum(0.0, logits)).sum(axis=1)
    if loss == "cross_entropy":
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        return log_norm - shifted[np.arange(len(labels)), labels.astype(np.int64)]
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def forward_from(z1: np.ndarray, upper_weights: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The network's forward pass from its first pre-activation z_1, kept: z_l = W_l [a_{l-1}, 1] for
    l = 2..L (``upper_weights`` = W_2..W_L) and a_l = relu(z_l) for l < L."""
    activations, preactivations = [], [z1]
    for weight in upper_weights:
        activations.append(relu(preactivations[-1]))
        preactivations.append(affine(weight, activations[-1]).astype(np.float32, copy=False))
    return activations, preactivations


def forward(weights: list[np.ndarray], a0: np.ndarray) -> np.ndarray:
    """Network logits z_L for input rows a_0 (:func:`forward_from` with z_1 = W_1 [a_0, 1])."""
    return forward_from(affine(weights[0], a0).astype(np.float32, copy=False), weights[1:])[1][-1]


def he_initial_weights(layer_sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """W_l ~ N(0, 2 / n_{l-1}) with zero bias: keeps forward-pass activations O(1) through ReLUs."""
    weights = []
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_out, fan_in))
        weights.append(np.hstack([weight, np.zeros((fan_out, 1))]).astype(np.float32))
    return weights
