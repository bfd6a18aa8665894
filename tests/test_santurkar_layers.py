"""LpBatchNorm and NoisyBatchNorm (Santurkar et al. 2018's variants) against NumPy references."""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import normzoo
from normzoo import nnx as nznnx
from tests.conftest import some_slow
from tests.test_multidevice import count_collectives

EPS = 1e-5
P_VALUES = (1, 2, math.inf)


def lp_reference(x, p, axes=(0,), mask=None):
    """float64: (y, mean, s_p^2) of the Lp normalization over ``axes``, optionally masked."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    n = m.sum(axes, keepdims=True)
    mean = np.where(m, x, 0).sum(axes, keepdims=True) / n
    dev = np.abs(x - mean)
    if p == 1:
        s = np.where(m, dev, 0).sum(axes, keepdims=True) / n * np.sqrt(np.pi / 2)
    elif p == 2:
        s = np.sqrt(np.where(m, dev**2, 0).sum(axes, keepdims=True) / n)
    else:
        s = np.where(m, dev, -np.inf).max(axes, keepdims=True)
    return (x - mean) / np.sqrt(s**2 + EPS), np.squeeze(mean, axes), np.squeeze(s**2, axes)


def _apply(layer, x, **kw):
    variables = layer.init(jax.random.key(0), x, **kw)
    return jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"], **kw))(variables, x)


@pytest.mark.parametrize("p", some_slow(P_VALUES, fast={1}))
@pytest.mark.parametrize("loc", some_slow((0.0, 1e4), fast={1e4}))
def test_lp_batch_norm_equals_numpy_with_mask_and_large_mean(p, loc, rng):
    """Output and running statistics (momentum 0.9: exactly 0.9 * init + 0.1 * batch), masked."""
    x = (rng.normal(size=(16, 3, 3, 4)) * 2 + loc).astype(np.float32)
    mask = rng.random((16, 1, 1, 1)) < 0.7
    y, upd = _apply(normzoo.LpBatchNorm(use_running_average=False, momentum=0.9, p=p), x, mask=jnp.asarray(mask))
    want, mean, var = lp_reference(x, p, axes=(0, 1, 2), mask=mask)
    # float32 inputs near 1e4 are themselves rounded to ~1e-3: the output can be no closer.
    np.testing.assert_allclose(y, want, atol=2e-3 if loc else 1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-4)


@pytest.mark.parametrize("p", some_slow((1, math.inf), fast={math.inf}))
def test_lp_batch_norm_constant_channel_and_gradients(p, rng):
    """No NaN from a constant channel (s_p = 0), and input gradients equal central differences
    of the float64 reference (both deviations are smooth away from ties)."""
    x = rng.normal(size=(12, 3)).astype(np.float32)
    x[:, 1] = 5.0
    w = rng.normal(size=x.shape)
    layer = normzoo.LpBatchNorm(use_running_average=False, p=p)
    v = layer.init(jax.random.key(0), x)
    f = lambda x: jnp.sum(layer.apply(v, x, mutable=["batch_stats"])[0] * w)  # noqa: E731
    y, g = jax.jit(jax.value_and_grad(f))(x)
    assert np.isfinite(y) and np.isfinite(g).all()
    x64, h = x.astype(np.float64), 1e-4
    want = np.zeros_like(x64)
    for idx in np.ndindex(x.shape):
        if idx[1] == 1:
            continue  # the constant channel: the reference divides 0 by sqrt(eps) too
        d = np.zeros_like(x64)
        d[idx] = h
        want[idx] = (np.sum(lp_reference(x64 + d, p)[0] * w) - np.sum(lp_reference(x64 - d, p)[0] * w)) / (2 * h)
    np.testing.assert_allclose(np.asarray(g)[:, [0, 2]], want[:, [0, 2]], rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_lp_batch_norm_p2_is_batch_norm_and_inference_uses_running_statistics(rng):
    x = rng.normal(size=(8, 5)).astype(np.float32) + 3
    y2, u2 = _apply(normzoo.LpBatchNorm(use_running_average=False, p=2), x)
    y, u = _apply(normzoo.BatchNorm(use_running_average=False), x)
    chex.assert_trees_all_equal((y2, u2), (y, u))
    stats = {"mean": jnp.full(5, 0.5), "var": jnp.full(5, 4.0)}
    params = {"scale": jnp.full(5, 2.0), "bias": jnp.full(5, 1.0)}
    got = normzoo.LpBatchNorm(use_running_average=True, p=1).apply({"params": params, "batch_stats": stats}, x)
    np.testing.assert_allclose(got, (x - 0.5) / np.sqrt(4.0 + EPS) * 2 + 1, rtol=1e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"p": 3}, ValueError, r"LpBatchNorm: p=3 must be 1, 2 or math.inf"),
    ({"p": "one"}, ValueError, r"p='one' must be 1, 2 or math.inf"),
    ({"p": 1, "virtual_batch_size": 2}, ValueError, r"virtual_batch_size=2 needs p=2, got p=1"),
])
def test_lp_batch_norm_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        normzoo.LpBatchNorm(use_running_average=False, **kwargs).init(jax.random.key(0), jnp.ones((4, 2)))


def test_lp_batch_norm_rejects_complex_for_p_other_than_2():
    x = jnp.ones((4, 2), jnp.complex64)
    with pytest.raises(TypeError, match=r"complex input \(dtype complex64\) needs p=2, got p=inf"):
        normzoo.LpBatchNorm(use_running_average=False, p=math.inf).init(jax.random.key(0), x)


@pytest.mark.parametrize("p,collectives", some_slow([(1, 2), (math.inf, 1)], fast={(math.inf, 1)}))
def test_lp_batch_norm_synced_across_8_devices_equals_the_global_batch(p, collectives, rng):
    """shard_map over 8 devices, uneven masks: output, running statistics and input gradients
    equal the single-device global batch; p=inf takes one collective, p=1 two."""
    d = 8
    x = (rng.normal(size=(32, 6)) * 2 + 1e3).astype(np.float32)
    mask = rng.random((32, 1)) < 0.6
    mask[:4] = False  # one device without any valid example
    w = rng.normal(size=x.shape).astype(np.float32)

    def step(layer, v, x, mask, w):
        def loss(x):
            y, upd = layer.apply(v, x, mask=mask, mutable=["batch_stats"])
            return jnp.sum(y * w), (y, upd)
        (_, (y, upd)), gx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, upd, gx

    plain = normzoo.LpBatchNorm(use_running_average=False, p=p, momentum=0.5)
    v = plain.init(jax.random.key(0), x)
    want = jax.jit(functools.partial(step, plain))(v, x, mask, w)
    synced = normzoo.LpBatchNorm(use_running_average=False, p=p, momentum=0.5, axis_name="b")
    mesh = jax.make_mesh((d,), ("b",))
    f = jax.jit(jax.shard_map(functools.partial(step, synced), mesh=mesh, in_specs=(P(), P("b"), P("b"), P("b")),
                              out_specs=(P("b"), P(), P("b"))))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("b")))  # noqa: E731
    got = f(v, put(x), put(mask), put(w))
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    hlo = jax.pmap(lambda x: synced.apply(v, x, mutable=["batch_stats"]), axis_name="b").lower(
        x.reshape(d, -1, 6)).compile().as_text()
    assert count_collectives(hlo) == collectives


def _noise_free(**kw):
    return dict(shift_range=0.0, scale_range=(1.0, 1.0), noise_width=0.0, **kw)


def test_noisy_batch_norm_noise_statistics(rng):
    """Per feature j: E[y] = mu_j in [-0.5, 0.5], E[y bn] / E[bn^2] = sigma_j in [1, 1.25], and the
    rest has variance w^2 E[bn^2] + w^2 / 3; the parameters differ across features and keys;
    the running statistics are BatchNorm's (taken before the noise)."""
    x = rng.normal(size=(8192, 6)).astype(np.float32) * 3 + 2
    layer = normzoo.NoisyBatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    f = jax.jit(lambda v, x, key: layer.apply(v, x, rngs={"noise": key}, mutable=["batch_stats"]))
    y, upd = f(v, x, jax.random.key(1))
    bn, bn_upd = normzoo.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
    chex.assert_trees_all_equal(upd, bn_upd)
    y, bn = np.asarray(y, np.float64), np.asarray(bn, np.float64)
    mu = y.mean(0)
    sigma = (y * bn).mean(0) / (bn**2).mean(0)
    rest = y - sigma * bn - mu
    assert np.all(np.abs(mu) <= 0.5 + 0.02) and mu.std() > 0.05
    assert np.all((sigma > 1 - 0.02) & (sigma < 1.25 + 0.02)) and sigma.std() > 0.01
    np.testing.assert_allclose(rest.var(0), 0.1**2 * (bn**2).mean(0) + 0.1**2 / 3, rtol=0.1)
    y2, _ = f(v, x, jax.random.key(2))
    assert np.abs(np.asarray(y2).mean(0) - mu).max() > 0.05  # re-drawn with every key
    chex.assert_trees_all_equal(f(v, x, jax.random.key(1))[0], f(v, x, jax.random.key(1))[0])


def test_noisy_batch_norm_without_noise_and_at_inference_is_batch_norm(rng):
    x = rng.normal(size=(16, 4)).astype(np.float32)
    v = normzoo.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    key = {"noise": jax.random.key(3)}
    got = normzoo.NoisyBatchNorm(**_noise_free()).apply(v, x, use_running_average=False, rngs=key, mutable=["batch_stats"])
    chex.assert_trees_all_close(got, normzoo.BatchNorm().apply(v, x, use_running_average=False, mutable=["batch_stats"]),
                                rtol=1e-6)
    eval_y = normzoo.NoisyBatchNorm().apply(v, x, use_running_average=True)  # no rng needed
    chex.assert_trees_all_equal(eval_y, normzoo.BatchNorm().apply(v, x, use_running_average=True))


@pytest.mark.parametrize("kwargs,match", [
    ({"scale_range": (1.25, 1.0)}, r"scale_range=\(1.25, 1.0\) must be a pair \(low, high\) with low <= high"),
    ({"scale_range": 2.0}, r"scale_range=2.0 must be a pair"),
    ({"shift_range": -1.0}, r"shift_range=-1.0 must be >= 0"),
    ({"noise_width": -0.1}, r"noise_width=-0.1 must be >= 0"),
])
def test_noisy_batch_norm_errors(kwargs, match):
    layer = normzoo.NoisyBatchNorm(use_running_average=False, **kwargs)
    with pytest.raises(ValueError, match=match):  # at init already: the configuration is checked first
        layer.init(jax.random.key(0), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=match):
        nznnx.NoisyBatchNorm(2, **kwargs, rngs=nnx.Rngs(0))


def test_noisy_batch_norm_needs_the_noise_stream():
    layer = normzoo.NoisyBatchNorm(use_running_average=False)
    v = layer.init(jax.random.key(0), jnp.ones((4, 2)))
    with pytest.raises(Exception, match=re.escape('needs PRNG for "noise"')):
        layer.apply(v, jnp.ones((4, 2)), mutable=["batch_stats"])


@pytest.mark.slow  # the NNX twins' doctests run by default
def test_registry_and_nnx_twins(rng):
    x = rng.normal(size=(16, 3)).astype(np.float32) + 2
    for name, p in (("l1_batch", 1), ("l2_batch", 2), ("linf_batch", math.inf)):
        layer = normzoo.make(name).norm(train=True)
        assert type(layer) is normzoo.LpBatchNorm and layer.p == p
        twin = nznnx.make(name).norm(3, train=True, rngs=nnx.Rngs(0))
        assert type(twin) is nznnx.LpBatchNorm and twin.p == p
        y, upd = _apply(layer, x)
        chex.assert_trees_all_close(twin(jnp.asarray(x)), y, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(nznnx.to_linen(twin)["batch_stats"], upd["batch_stats"], rtol=1e-6)
    noisy = nznnx.make("noisy_batch").norm(3, train=True, rngs=nnx.Rngs(params=0, noise=1))
    y1, y2 = noisy(jnp.asarray(x)), noisy(jnp.asarray(x))
    assert type(noisy) is nznnx.NoisyBatchNorm and not np.allclose(y1, y2)
    noisy.eval()
    want = normzoo.BatchNorm(use_running_average=True).apply(nznnx.to_linen(noisy), x)
    chex.assert_trees_all_close(noisy(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)
    quiet = nznnx.NoisyBatchNorm(3, rngs=nnx.Rngs(0), **_noise_free())
    chex.assert_trees_all_close(quiet(jnp.asarray(x)), nznnx.BatchNorm(3, rngs=nnx.Rngs(0))(jnp.asarray(x)), rtol=1e-6,
                                atol=1e-6)
