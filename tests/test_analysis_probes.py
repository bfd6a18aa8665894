"""normzoo.analysis's Jacobian spectrum and invariance probe on maps whose answers are known."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from normzoo import analysis


def _known_map(rng, n=24, m=30):
    """x -> A x with A = U diag(s) V^T, singular values s chosen (one repeated, spread 100x)."""
    s = np.sort(np.concatenate([rng.uniform(0.05, 5.0, n - 2), [2.0, 2.0]]))[::-1]
    u = np.linalg.qr(rng.normal(size=(m, n)))[0]
    v = np.linalg.qr(rng.normal(size=(n, n)))[0]
    a = jnp.asarray(u @ np.diag(s) @ v.T, jnp.float32)
    return s, (lambda x: a @ x), jnp.asarray(rng.normal(size=n), jnp.float32)


def test_exact_and_lanczos_spectra_of_a_linear_map_equal_its_singular_values(rng):
    s, fn, x = _known_map(rng)
    exact = analysis.jacobian_spectrum(fn, x, method="exact")
    np.testing.assert_allclose(exact.singular_values, s, rtol=1e-5)
    assert exact.shape == (30, 24) and exact.method == "exact"
    np.testing.assert_allclose(exact.weights.sum(), 1.0)
    # Lanczos with as many steps as dimensions: the whole spectrum (the repeated value once:
    # a Krylov space sees one copy of a repeated eigenvalue).
    full = analysis.jacobian_spectrum(fn, x, method="lanczos", iterations=24)
    np.testing.assert_allclose(full.singular_values[:3], s[:3], rtol=1e-4)
    np.testing.assert_allclose(full.smallest, s[-1], rtol=1e-3)
    np.testing.assert_allclose(full.weights.sum(), 1.0, rtol=1e-5)
    # Fewer steps than dimensions: the extreme values first.
    part = analysis.jacobian_spectrum(fn, x, method="lanczos", iterations=12, key=jax.random.key(3))
    np.testing.assert_allclose(part.largest, s[0], rtol=2e-3)  # uniform spread: slow convergence
    assert s[-1] <= part.smallest < s[len(s) // 2]
    assert part.singular_values.shape == (12,)


def test_batch_norm_jacobian_over_the_batch_has_the_closed_form_spectrum(rng):
    # One channel, training mode, scale 1: dy/dx = (I - 11^T/n - xh xh^T * var/(n (var+eps))) / sqrt(var+eps),
    # so n - 2 singular values 1/sqrt(var+eps), 0 (the mean direction), and eps/(var+eps)^1.5.
    n, eps = 32, 1e-3
    x = jnp.asarray(rng.normal(size=(n, 1)) * 2.0 + 5.0, jnp.float32)
    bn = normzoo.BatchNorm(use_running_average=False, epsilon=eps)
    variables = bn.init(jax.random.key(0), x)
    fn = lambda x: bn.apply(variables, x, mutable=["batch_stats"])[0]
    spec = analysis.jacobian_spectrum(fn, x, method="exact")
    var = float(np.var(np.asarray(x, np.float64)))
    expect = np.sort(np.r_[np.full(n - 2, (var + eps) ** -0.5), eps / (var + eps) ** 1.5, 0.0])[::-1]
    np.testing.assert_allclose(spec.singular_values, expect, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(spec.smallest_nonzero(rtol=1e-2), (var + eps) ** -0.5, rtol=1e-3)
    assert spec.histogram([0.0, 0.1, 10.0]).tolist() == pytest.approx([2 / n, (n - 2) / n])
    # The Lanczos path on the same map: the largest value and its share.
    lz = analysis.jacobian_spectrum(fn, x, method="lanczos", iterations=8)
    np.testing.assert_allclose(lz.largest, (var + eps) ** -0.5, rtol=1e-4)


def test_jacobian_spectrum_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"method='svd'; use 'auto', 'exact' or 'lanczos'"):
        analysis.jacobian_spectrum(lambda x: x, jnp.ones(3), method="svd")
    with pytest.raises(ValueError, match=r"iterations=0 must be a positive int"):
        analysis.jacobian_spectrum(lambda x: x, jnp.ones(3), method="lanczos", iterations=0)


def _probe(norm, x, dense=nn.Dense, factors=(0.1, 10.0), weights="kernel"):
    model = nn.Sequential([dense(6, use_bias=False), norm])
    variables = model.init(jax.random.key(1), x)

    def fn(p, x):
        return model.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]

    return analysis.invariance_probe(fn, variables["params"], x, factors=factors, weights=weights)


@pytest.fixture
def x(rng):
    return jnp.asarray(rng.normal(size=(16, 5)) + 0.5, jnp.float32)


def test_invariance_probe_batch_norm_undoes_weight_and_dataset_scale_not_per_example_scale(x):
    p = _probe(normzoo.BatchNorm(use_running_average=False, epsilon=1e-8), x)
    np.testing.assert_array_less(p.weights_output, 1e-5)
    np.testing.assert_array_less(p.input_output, 1e-5)
    assert np.all(p.example_output > 0.1)
    np.testing.assert_allclose(p.weights_grad_ratio, [10.0, 0.1], rtol=1e-3)  # 1 / a
    assert p.factors == (0.1, 10.0)


def test_invariance_probe_layer_norm_undoes_per_example_scale(x):
    p = _probe(normzoo.LayerNorm(epsilon=1e-8), x)
    np.testing.assert_array_less(p.example_output, 1e-5)
    np.testing.assert_array_less(p.weights_output, 1e-5)  # the whole kernel re-scaled: each row's scale
    np.testing.assert_allclose(p.weights_grad_ratio, [10.0, 0.1], rtol=1e-3)


def test_invariance_probe_without_normalizer_is_linear_in_each_scale(x):
    p = _probe(normzoo.make("none").norm(train=True), x)
    a = np.asarray([0.1, 10.0])
    np.testing.assert_allclose(p.weights_output, np.abs(a - 1), rtol=1e-5)
    np.testing.assert_allclose(p.input_output, np.abs(a - 1), rtol=1e-5)
    np.testing.assert_allclose(p.weights_grad_ratio, 1.0, rtol=1e-5)  # a linear map's gradient ignores W


def test_invariance_probe_cosine_dense_undoes_weight_and_per_example_scale(x):
    p = _probe(normzoo.make("none").norm(train=True), x, dense=normzoo.CosineDense)
    np.testing.assert_array_less(p.weights_output, 1e-5)
    np.testing.assert_array_less(p.example_output, 1e-5)


def test_invariance_probe_rejects_bad_arguments(x):
    with pytest.raises(ValueError, match=r"weights='conv' selects no parameter; the paths are \['layers_0/kernel'"):
        _probe(normzoo.LayerNorm(), x, weights="conv")
    with pytest.raises(ValueError, match=r"factors=\(0.0,\) must be finite and positive"):
        _probe(normzoo.LayerNorm(), x, factors=(0.0,))
