"""normzoo.analysis on models whose answers are known in closed form (NumPy, float64)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from normzoo import analysis


# ----------------------------------------------------------------------------- a deep linear network


def _linear_net(rng):
    """Three matrices, the loss 0.5 * mean ||W3 W2 W1 x - y||^2; params deliberately in another
    order than the forward one (as dicts returned by jit are: sorted keys)."""
    w = [rng.normal(size=s) * 0.7 for s in ((3, 4), (4, 4), (4, 2))]
    x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    params = {"c": {"kernel": jnp.asarray(w[2], jnp.float32)}, "a": {"kernel": jnp.asarray(w[0], jnp.float32)},
              "b": {"kernel": jnp.asarray(w[1], jnp.float32)}}

    def loss_fn(params, batch):
        x, y = batch
        h = x @ params["a"]["kernel"] @ params["b"]["kernel"] @ params["c"]["kernel"]
        return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, -1))

    return w, x, y, params, loss_fn


def _grads(w, x, y):
    """Hand-derived gradients of 0.5 * mean ||x W1 W2 W3 - y||^2."""
    n = len(x)
    r = (x @ w[0] @ w[1] @ w[2] - y) / n
    return [x.T @ r @ (w[1] @ w[2]).T, (x @ w[0]).T @ r @ w[2].T, (x @ w[0] @ w[1]).T @ r]


def test_internal_covariate_shift_of_a_deep_linear_network_equals_the_hand_computed_one(rng):
    w, x, y, params, loss_fn = _linear_net(rng)
    lr = 0.3
    ics = analysis.internal_covariate_shift(loss_fn, params, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)),
                                            learning_rate=lr)
    assert ics.layers == ("a", "b", "c")  # the forward order, not the dict's
    g = _grads(w, x, y)
    stepped = [wi - lr * gi for wi, gi in zip(w, g)]
    l2, cos = [], []
    for i in range(3):
        g_prime = _grads(stepped[:i] + w[i:], x, y)[i]  # layers before i moved, the rest not
        l2.append(np.linalg.norm(g[i] - g_prime))
        cos.append(np.sum(g[i] * g_prime) / np.linalg.norm(g[i]) / np.linalg.norm(g_prime))
    np.testing.assert_allclose(ics.l2, l2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ics.cosine, cos, rtol=1e-5)
    np.testing.assert_allclose(ics.grad_norm, [np.linalg.norm(gi) for gi in g], rtol=1e-5)
    assert ics.l2[0] < 1e-6 and l2[2] > 1e-2  # the first layer has no predecessor
    chunked = analysis.internal_covariate_shift(loss_fn, params, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)),
                                                learning_rate=lr, chunk=2)  # lax.map over vmap-ed pairs
    np.testing.assert_allclose(chunked.l2, l2, rtol=1e-4, atol=1e-6)


def test_internal_covariate_shift_takes_the_optimizers_updates_and_chosen_layers(rng):
    w, x, y, params, loss_fn = _linear_net(rng)
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    updates = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params)  # any step, e.g. optax's
    ics = analysis.internal_covariate_shift(loss_fn, params, batch, updates, layers=("c",))
    moved = [wi + 0.05 for wi in w[:2]] + [w[2]]
    want = np.linalg.norm(_grads(w, x, y)[2] - _grads(moved, x, y)[2])
    assert ics.layers == ("c",)
    np.testing.assert_allclose(ics.l2, [want], rtol=1e-4)
    with pytest.raises(ValueError, match=r"give exactly one of updates .* and learning_rate"):
        analysis.internal_covariate_shift(loss_fn, params, batch)
    with pytest.raises(ValueError, match=r"layer 'd' owns no parameter; give '/'-joined module paths"):
        analysis.internal_covariate_shift(loss_fn, params, batch, learning_rate=0.1, layers=("d",))


def test_loss_landscape_of_a_quadratic(rng):
    """L = 0.5 theta^T A theta: L(theta - eta g) = 0.5 (theta - eta A theta)^T A (...), the gradient
    moves by eta A^2 theta, and the effective smoothness is max ||A^2 theta|| / ||A theta||."""
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    eig = np.array([0.5, 1.0, 2.0, 3.0, 7.0])
    a = q @ np.diag(eig) @ q.T
    theta = rng.normal(size=5)

    def loss_fn(params, batch):
        return 0.5 * params["t"] @ batch @ params["t"]

    etas = np.array([0.01, 0.05, 0.1, 0.2])
    land = analysis.loss_landscape(loss_fn, {"t": jnp.asarray(theta, jnp.float32)}, jnp.asarray(a, jnp.float32), etas)
    g = a @ theta
    want_loss = [0.5 * (theta - e * g) @ a @ (theta - e * g) for e in etas]
    np.testing.assert_allclose(land.loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(land.grad_distance, [e * np.linalg.norm(a @ g) for e in etas], rtol=1e-5)
    np.testing.assert_allclose(land.smoothness, np.linalg.norm(a @ g) / np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(land.loss0, 0.5 * theta @ a @ theta, rtol=1e-6)
    chunked = analysis.loss_landscape(loss_fn, {"t": jnp.asarray(theta, jnp.float32)}, jnp.asarray(a, jnp.float32), etas,
                                      chunk=3)  # 4 step sizes in vmap-ed chunks of 3 (the last one padded)
    np.testing.assert_allclose(chunked.loss, want_loss, rtol=1e-5)
    # Along the top eigenvector the effective smoothness is the largest eigenvalue.
    top = analysis.loss_landscape(loss_fn, {"t": jnp.asarray(q[:, -1], jnp.float32)}, jnp.asarray(a, jnp.float32), etas)
    np.testing.assert_allclose(top.smoothness, 7.0, rtol=1e-4)
    # A given direction instead of the gradient.
    d = {"t": jnp.asarray(q[:, 0], jnp.float32)}
    along = analysis.loss_landscape(loss_fn, {"t": jnp.asarray(theta, jnp.float32)}, jnp.asarray(a, jnp.float32), etas, d)
    np.testing.assert_allclose(along.grad_distance, [e * 0.5 for e in etas], rtol=1e-4)
    with pytest.raises(ValueError, match=r"step_sizes must be 1-D, got shape \(2, 2\)"):
        analysis.loss_landscape(loss_fn, {"t": jnp.asarray(theta)}, jnp.asarray(a), jnp.ones((2, 2)))


def test_activation_probes_of_a_model_equal_numpy(rng):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6)(x)
            return nn.relu(normzoo.BatchNorm(use_running_average=False)(h))

    x = jnp.asarray(rng.normal(size=(32, 3)) * 3, jnp.float32)
    net = Net()
    v = net.init(jax.random.key(0), x)
    out, acts = analysis.capture(net, v, x, mutable=["batch_stats"])
    assert sorted(acts) == ["BatchNorm_0", "Dense_0"]
    h = np.asarray(x, np.float64) @ np.asarray(v["params"]["Dense_0"]["kernel"]) + np.asarray(v["params"]["Dense_0"]["bias"])
    np.testing.assert_allclose(acts["Dense_0"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, np.maximum(acts["BatchNorm_0"], 0), rtol=1e-6)
    stats = analysis.activation_stats(acts, quantiles=(10.0, 50.0, 90.0), edges=(-2.0, 0.0, 2.0), saturation=1.5)
    s, a = stats["Dense_0"], np.asarray(acts["Dense_0"], np.float64)
    np.testing.assert_allclose(s.percentiles, np.percentile(a, [10, 50, 90]), rtol=1e-5)
    np.testing.assert_allclose([s.mean, s.std], [a.mean(), a.std()], rtol=1e-5)
    np.testing.assert_allclose([s.negative, s.saturated], [(a < 0).mean(), (np.abs(a) > 1.5).mean()])
    np.testing.assert_array_equal(s.histogram, np.histogram(np.clip(a, -2, 2), bins=[-2.0, 0.0, 2.0])[0])
    np.testing.assert_allclose(s.channel_var, a.var(0), rtol=1e-5)
    shifted = {k: v + 1.0 for k, v in acts.items()}
    shift = analysis.distribution_shift(stats, analysis.activation_stats(shifted, quantiles=(50.0,)))
    np.testing.assert_allclose([shift["Dense_0"]["mean"], shift["Dense_0"]["std"]], [1.0, 0.0], atol=1e-5)
