"""Invariances the normalizers promise, checked with hypothesis."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import normzoo

SETTINGS = settings(max_examples=20, deadline=None)
scales = st.floats(min_value=1e-2, max_value=1e3)
seeds = st.integers(0, 2**16)


def _x(seed, shape=(8, 4, 4, 6)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2 + 1


@SETTINGS
@given(seed=seeds, a=scales)
def test_batch_norm_invariant_to_positive_input_scale(seed, a):
    x = _x(seed)
    layer = normzoo.BatchNorm(use_running_average=False, epsilon=0.0)
    v = layer.init(jax.random.key(0), x)
    y1, _ = layer.apply(v, x, mutable=["batch_stats"])
    y2, _ = layer.apply(v, x * np.float32(a), mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, atol=1e-4)


@SETTINGS
@given(seed=seeds, a=scales, shift=st.floats(-1e3, 1e3))
def test_layer_norm_invariant_to_affine_input_change(seed, a, shift):
    x = _x(seed, (4, 32))
    layer = normzoo.LayerNorm(epsilon=0.0)
    v = layer.init(jax.random.key(0), x)
    y1 = layer.apply(v, x)
    x2 = x * np.float32(a) + np.float32(shift)
    y2 = layer.apply(v, x2)
    # float32 itself stores x2 only to ulp(|x2|), i.e. ulp / (a * std) in normalized units.
    quantum = np.spacing(np.abs(x2).max()) / (a * x.std(-1).min())
    np.testing.assert_allclose(y1, y2, atol=1e-4 + 4 * quantum)


@SETTINGS
@given(seed=seeds, a=scales)
def test_weight_norm_invariant_to_direction_scale(seed, a):
    x = _x(seed, (5, 7))
    layer = normzoo.WeightNormDense(3)
    p = layer.init(jax.random.key(seed), x)["params"]
    y1 = layer.apply({"params": p}, x)
    y2 = layer.apply({"params": {**p, "v": p["v"] * a}}, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(seed=seeds, a=scales, b=scales)
def test_cosine_invariant_to_kernel_and_input_scale(seed, a, b):
    x = _x(seed, (2, 5, 5, 3))
    for layer in (normzoo.CosineConv(4, (3, 3)), normzoo.CosineDense(4)):
        p = layer.init(jax.random.key(seed), x)["params"]
        y1 = layer.apply({"params": p}, x)
        y2 = layer.apply({"params": {"kernel": p["kernel"] * a}}, x * np.float32(b))
        np.testing.assert_allclose(y1, y2, atol=1e-4)


@SETTINGS
@given(seed=seeds, a=scales)
def test_group_and_instance_norm_invariant_to_input_scale(seed, a):
    x = _x(seed)
    for layer in (normzoo.GroupNorm(num_groups=2, epsilon=0.0), normzoo.InstanceNorm(epsilon=0.0)):
        v = layer.init(jax.random.key(0), x)
        np.testing.assert_allclose(layer.apply(v, x), layer.apply(v, x * np.float32(a)), atol=1e-4)


@SETTINGS
@given(seed=seeds, a=scales)
def test_rms_norm_invariant_to_input_scale(seed, a):
    x = _x(seed, (3, 16))
    layer = normzoo.RMSNorm(epsilon=0.0)
    v = layer.init(jax.random.key(0), x)
    np.testing.assert_allclose(layer.apply(v, x), layer.apply(v, x * np.float32(a)), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=seeds, shift=st.floats(-1e4, 1e4))
def test_moments_shift_equivariant(seed, shift):
    x = _x(seed, (64, 3))
    m1, v1 = normzoo.moments(jnp.asarray(x), 0)
    m2, v2 = normzoo.moments(jnp.asarray(x + np.float32(shift)), 0)
    xs = (x + np.float32(shift)).astype(np.float64)  # exactly what float32 stored
    np.testing.assert_allclose(m2, xs.mean(0), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(v2, xs.var(0), rtol=1e-3, atol=1e-3)
    assert np.all(np.asarray(v1) > 0)
