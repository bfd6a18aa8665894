"""LayerNorm, RMSNorm, GroupNorm, InstanceNorm against NumPy references and flax.linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from tests import reference as ref
from tests.test_batch import TOL, make_input

SHAPE = (4, 5, 6, 8)

# name -> (normzoo layer, flax counterpart, reference(x), axes the backward reduces over)
LAYERS = {
    "layer": (normzoo.LayerNorm(), nn.LayerNorm(), lambda x: ref.layer_norm(x, (-1,), 1e-6)),
    "layer_chw": (
        normzoo.LayerNorm(reduction_axes=(1, 2, 3)),
        nn.LayerNorm(reduction_axes=(1, 2, 3)),
        lambda x: ref.layer_norm(x, (1, 2, 3), 1e-6),
    ),
    "rms": (normzoo.RMSNorm(), nn.RMSNorm(), lambda x: ref.rms_norm(x, (-1,), 1e-6)),
    "group": (normzoo.GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4), lambda x: ref.group_norm(x, 4, 1e-6)),
    "group_size": (
        normzoo.GroupNorm(num_groups=None, group_size=4),
        nn.GroupNorm(num_groups=None, group_size=4),
        lambda x: ref.group_norm(x, 2, 1e-6),
    ),
    "instance": (normzoo.InstanceNorm(), nn.InstanceNorm(), lambda x: ref.instance_norm(x, 1e-6)),
}


# RMSNorm has no mean, so no statistics path: it runs once, the others on both paths.
CENTERED = sorted(n for n in LAYERS if n != "rms")
CASES = sorted(["normal", "large_mean", "constant_channel"])


def _check_reference(name, case):
    layer, _, reference = LAYERS[name]
    x = make_input(case, SHAPE)
    y, _ = jax.jit(layer.init_with_output)(jax.random.key(0), x)
    tol = TOL[case] * (10 if name == "rms" and case == "large_mean" else 1)
    np.testing.assert_allclose(y, reference(x), atol=tol, rtol=1e-6)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CENTERED)
def test_matches_reference(name, case, stats_path):
    _check_reference(name, case)


@pytest.mark.parametrize("case", CASES)
def test_rms_matches_reference(case):
    _check_reference("rms", case)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_same_as_flax_with_swapped_variables(name):
    ours, theirs, _ = LAYERS[name]
    x = make_input("normal", SHAPE, seed=4)
    v = theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(v)
    v = jax.tree.map(lambda p: p + jnp.linspace(-0.5, 0.5, p.size).reshape(p.shape), v)
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), atol=2e-5)


def _norm_backward(x, g, axes, eps, center=True):
    """Analytic backward of (x - mean) / sqrt(var + eps) over ``axes`` (RMS: no centring)."""
    x, g = ref.f64(x), ref.f64(g)
    if center:
        xhat = ref.batch_norm(x, axes, eps)
        inv = 1 / np.sqrt(x.var(axes, keepdims=True) + eps)
        return inv * (g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True))
    inv = 1 / np.sqrt((x**2).mean(axes, keepdims=True) + eps)
    xhat = x * inv
    return inv * (g - xhat * (g * xhat).mean(axes, keepdims=True))


def _check_input_gradient(name, axes, center, case):
    layer = LAYERS[name][0]
    x = make_input(case, SHAPE, seed=7)
    w = np.random.default_rng(8).normal(size=SHAPE).astype(np.float32)
    v = layer.init(jax.random.key(0), x)
    gx = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply(v, x) * w)))(x)
    # x ~ N(1e4, 1) carries float32's rounding of 1e4 (ulp 1e-3) into every x - mean.
    atol = 5e-5 if case == "normal" else 1e-2
    np.testing.assert_allclose(gx, _norm_backward(x, w, axes, 1e-6, center), atol=atol)


@pytest.mark.parametrize("name,axes", [("layer", (-1,)), ("layer_chw", (1, 2, 3)), ("instance", (1, 2))])
@pytest.mark.parametrize("case", ["normal", "large_mean"])
def test_input_gradient_matches_reference(name, axes, case, stats_path):
    _check_input_gradient(name, axes, True, case)


@pytest.mark.parametrize("case", ["normal", "large_mean"])
def test_rms_input_gradient_matches_reference(case):
    _check_input_gradient("rms", (-1,), False, case)


def test_group_norm_gradient_matches_reference():
    x = make_input("normal", SHAPE, seed=7)
    w = np.random.default_rng(8).normal(size=SHAPE)
    layer = normzoo.GroupNorm(num_groups=4)
    v = layer.init(jax.random.key(0), x)
    gx = jax.grad(lambda x: jnp.sum(layer.apply(v, x) * w))(x)
    grouped = lambda a: a.reshape(SHAPE[:-1] + (4, 2))  # noqa: E731
    want = _norm_backward(grouped(x), grouped(w), (1, 2, 4), 1e-6).reshape(SHAPE)
    np.testing.assert_allclose(gx, want, atol=5e-5)


def test_group_norm_one_group_equals_layer_norm_over_hwc():
    x = make_input("normal", SHAPE, seed=2)
    gn = normzoo.GroupNorm(num_groups=1, epsilon=1e-5)
    ln = normzoo.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1, epsilon=1e-5)
    v = gn.init(jax.random.key(0), x)
    v = jax.tree.map(lambda p: p + jnp.linspace(0, 1, p.size), v)
    np.testing.assert_allclose(gn.apply(v, x), ln.apply(v, x), atol=1e-6)


def test_group_norm_with_as_many_groups_as_channels_equals_instance_norm():
    x = make_input("normal", SHAPE, seed=2)
    y1, _ = normzoo.GroupNorm(num_groups=8).init_with_output(jax.random.key(0), x)
    y2, _ = normzoo.InstanceNorm().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, atol=1e-6)


@pytest.mark.parametrize("layer", [normzoo.LayerNorm(), normzoo.GroupNorm(num_groups=2), normzoo.InstanceNorm()])
def test_mask_matches_reference(layer):
    x = make_input("normal", SHAPE, seed=3)
    mask = np.random.default_rng(3).random(SHAPE[:-1] + (1,)) > 0.3
    mask = np.broadcast_to(mask, SHAPE) if isinstance(layer, normzoo.GroupNorm) else mask
    y, _ = layer.init_with_output(jax.random.key(0), x, mask=jnp.asarray(mask))
    if isinstance(layer, normzoo.LayerNorm):
        # Masking whole positions of a last-axis LayerNorm: each row is all-in or all-out.
        want = ref.layer_norm(x, (-1,), 1e-6)
        keep = np.broadcast_to(mask, SHAPE)
        np.testing.assert_allclose(np.asarray(y)[keep], want[keep], atol=2e-5)
        return
    if isinstance(layer, normzoo.GroupNorm):
        g = lambda a: a.reshape(SHAPE[:-1] + (2, 4))  # noqa: E731
        want, _, _ = ref.masked_batch_norm(g(x), g(mask), (1, 2, 4), 1e-6)
        want = want.reshape(SHAPE)
    else:
        want, _, _ = ref.masked_batch_norm(x, mask, (1, 2), 1e-6)
    keep = np.broadcast_to(mask, SHAPE)
    np.testing.assert_allclose(np.asarray(y)[keep], want[keep], atol=2e-5)


def test_instance_norm_tracks_running_statistics():
    x = make_input("normal", SHAPE, seed=9)
    layer = normzoo.InstanceNorm(track_running_stats=True, momentum=0.5)
    v = layer.init(jax.random.key(0), x, use_running_average=False)
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref.instance_norm(x, 1e-6), atol=2e-5)
    inst_mean = ref.f64(x).mean((1, 2)).mean(0)
    inst_var = ref.f64(x).var((1, 2)).mean(0)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.5 * inst_mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.5 + 0.5 * inst_var, rtol=1e-5)
    y_eval = layer.apply({**v, **upd}, x, use_running_average=True)
    want = (ref.f64(x) - upd["batch_stats"]["mean"]) / np.sqrt(ref.f64(upd["batch_stats"]["var"]) + 1e-6)
    np.testing.assert_allclose(y_eval, want, atol=2e-5)
    assert "batch_stats" not in normzoo.InstanceNorm().init(jax.random.key(0), x)


def test_bfloat16_output_with_float32_statistics():
    x = jnp.asarray(make_input("large_mean", (2, 16, 64)), jnp.bfloat16)
    y, _ = normzoo.LayerNorm(dtype=jnp.bfloat16).init_with_output(jax.random.key(0), x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref.layer_norm(np.asarray(x, np.float32), (-1,), 1e-6), atol=0.05)
