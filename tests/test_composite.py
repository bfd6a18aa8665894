"""IBN against its definition and its limits (ratio 0 / 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from tests import reference as ref
from tests.test_batch import make_input

SHAPE = (6, 4, 4, 8)


def test_ibn_matches_reference_halves(stats_path):
    x = make_input("normal", SHAPE)
    layer = normzoo.IBN(ratio=0.25, use_running_average=False, momentum=0.0)
    v = layer.init(jax.random.key(0), x)
    assert v["params"]["IN"]["scale"].shape == (2,) and v["params"]["BN"]["scale"].shape == (6,)
    y, upd = layer.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y)[..., :2], ref.instance_norm(x[..., :2], 1e-5), atol=2e-5)
    np.testing.assert_allclose(np.asarray(y)[..., 2:], ref.batch_norm(x[..., 2:], (0, 1, 2), 1e-5), atol=2e-5)
    np.testing.assert_allclose(upd["batch_stats"]["BN"]["mean"], ref.f64(x[..., 2:]).mean((0, 1, 2)), rtol=1e-5)


def test_ibn_ratio_one_is_instance_norm_and_zero_is_batch_norm(stats_path):
    x = make_input("normal", SHAPE, seed=1)
    y1, v1 = normzoo.IBN(ratio=1.0, use_running_average=False).init_with_output(jax.random.key(0), x)
    y_in, _ = normzoo.InstanceNorm(epsilon=1e-5).init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y_in, atol=1e-6)
    assert "BN" not in v1["params"]
    ibn0 = normzoo.IBN(ratio=0.0, use_running_average=False)
    v0 = ibn0.init(jax.random.key(0), x)
    y0, u0 = ibn0.apply(v0, x, mutable=["batch_stats"])
    bn = normzoo.BatchNorm(use_running_average=False)
    yb, ub = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    np.testing.assert_allclose(y0, yb, atol=1e-6)
    np.testing.assert_allclose(u0["batch_stats"]["BN"]["var"], ub["batch_stats"]["var"], rtol=1e-6)


def test_ibn_eval_uses_running_statistics_for_the_batch_half(stats_path):
    x = make_input("normal", SHAPE, seed=2)
    layer = normzoo.IBN(ratio=0.5)
    v = layer.init(jax.random.key(0), x, use_running_average=True)
    stats = {"BN": {"mean": jnp.full(4, 1.0), "var": jnp.full(4, 4.0)}}
    y = layer.apply({"params": v["params"], "batch_stats": stats}, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y)[..., 4:], (ref.f64(x[..., 4:]) - 1) / np.sqrt(4 + 1e-5), atol=1e-5)
    np.testing.assert_allclose(np.asarray(y)[..., :4], ref.instance_norm(x[..., :4], 1e-5), atol=2e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_ibn_gradients_finite_on_constant_channel(ratio, stats_path):
    x = make_input("constant_channel", SHAPE)
    layer = normzoo.IBN(ratio=ratio, use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    g = jax.grad(lambda x: jnp.sum(layer.apply(v, x, mutable=["batch_stats"])[0] ** 2))(x)
    assert np.all(np.isfinite(g))


def _split_reference(layer, variables, x, mask=None, **bn_kw):
    """IBN written out as the split-normalize-concatenate of its definition, with its variables."""
    k = int(x.shape[-1] * layer.ratio)
    p, s = variables["params"], variables["batch_stats"]
    inn = normzoo.InstanceNorm(epsilon=layer.epsilon)
    bn = normzoo.BatchNorm(use_running_average=False, epsilon=layer.epsilon, **bn_kw)
    m = (None, None) if mask is None else (mask[..., :k], mask[..., k:])
    y_in = inn.apply({"params": p["IN"]}, x[..., :k], mask=m[0])
    y_bn, upd = bn.apply({"params": p["BN"], "batch_stats": s["BN"]}, x[..., k:], mask=m[1],
                         mutable=["batch_stats"])
    return jnp.concatenate([y_in, y_bn], -1), upd["batch_stats"]


@pytest.mark.parametrize("extra", [{}, pytest.param({"virtual_batch_size": 2}, marks=pytest.mark.slow), {"masked": True}])
def test_ibn_one_pass_equals_split_definition_with_gradients(extra, stats_path):
    """The joined affine maps give the split definition's outputs, statistics and gradients."""
    x = make_input("large_mean", SHAPE, seed=3)
    kw = {k: v for k, v in extra.items() if k != "masked"}
    mask = None
    if extra.get("masked"):
        mask = jnp.asarray(np.random.default_rng(0).random(SHAPE) < 0.7)
    layer = normzoo.IBN(ratio=0.25, use_running_average=False, **kw)
    v = layer.init(jax.random.key(0), x)
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(1.0, 0.3, a.shape), a.dtype), v)  # non-trivial params
    w = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)

    def ours(params, x):
        y, upd = layer.apply({**v, "params": params}, x, mask=mask, mutable=["batch_stats"])
        return jnp.sum(y * w), (y, upd["batch_stats"]["BN"])

    def theirs(params, x):
        y, stats = _split_reference(layer, {**v, "params": params}, x, mask, **kw)
        return jnp.sum(y * w), (y, stats)

    (_, (y1, s1)), g1 = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(v["params"], x)
    (_, (y2, s2)), g2 = jax.value_and_grad(theirs, argnums=(0, 1), has_aux=True)(v["params"], x)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s1, s2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g2)
