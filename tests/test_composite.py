"""IBN against its definition and its limits (ratio 0 / 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from tests import reference as ref
from tests.test_batch import make_input

SHAPE = (6, 4, 4, 8)


def test_ibn_matches_reference_halves():
    x = make_input("normal", SHAPE)
    layer = normzoo.IBN(ratio=0.25, use_running_average=False, momentum=0.0)
    v = layer.init(jax.random.key(0), x)
    assert v["params"]["IN"]["scale"].shape == (2,) and v["params"]["BN"]["scale"].shape == (6,)
    y, upd = layer.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y)[..., :2], ref.instance_norm(x[..., :2], 1e-5), atol=2e-5)
    np.testing.assert_allclose(np.asarray(y)[..., 2:], ref.batch_norm(x[..., 2:], (0, 1, 2), 1e-5), atol=2e-5)
    np.testing.assert_allclose(upd["batch_stats"]["BN"]["mean"], ref.f64(x[..., 2:]).mean((0, 1, 2)), rtol=1e-5)


def test_ibn_ratio_one_is_instance_norm_and_zero_is_batch_norm():
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


def test_ibn_eval_uses_running_statistics_for_the_batch_half():
    x = make_input("normal", SHAPE, seed=2)
    layer = normzoo.IBN(ratio=0.5)
    v = layer.init(jax.random.key(0), x, use_running_average=True)
    stats = {"BN": {"mean": jnp.full(4, 1.0), "var": jnp.full(4, 4.0)}}
    y = layer.apply({"params": v["params"], "batch_stats": stats}, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y)[..., 4:], (ref.f64(x[..., 4:]) - 1) / np.sqrt(4 + 1e-5), atol=1e-5)
    np.testing.assert_allclose(np.asarray(y)[..., :4], ref.instance_norm(x[..., :4], 1e-5), atol=2e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_ibn_gradients_finite_on_constant_channel(ratio):
    x = make_input("constant_channel", SHAPE)
    layer = normzoo.IBN(ratio=ratio, use_running_average=False)
    v = layer.init(jax.random.key(0), x)
    g = jax.grad(lambda x: jnp.sum(layer.apply(v, x, mutable=["batch_stats"])[0] ** 2))(x)
    assert np.all(np.isfinite(g))
