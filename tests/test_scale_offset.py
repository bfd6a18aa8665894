"""``scale_plus_one``: the scale stored as an offset from 1 (Gemma's RMSNorm, praxis' BatchNorm), on
every layer with a ``scale``, linen and nnx: a checkpoint stored that way gives the layer the
multiplier ``1 + scale``, a plain checkpoint moved over (scale - 1) gives the same outputs and
gradients, and Gemma's RMSNorm formula is reproduced from NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
from normzoo import nnx as nznnx
from tests import reference as ref
from tests.conftest import some_slow

SHAPE = (6, 3, 3, 8)
# linen layer -> its constructor keywords and call keywords
LINEN = {
    "BatchNorm": ({"use_running_average": False}, {}),
    "BatchRenorm": ({"use_running_average": False}, {}),
    "LpBatchNorm": ({"use_running_average": False, "p": 1}, {}),
    "NoisyBatchNorm": ({"use_running_average": True}, {}),
    "MeanOnlyBatchNorm": ({"use_running_average": False, "use_scale": True}, {}),
    "IBN": ({"use_running_average": False}, {}),
    "LayerNorm": ({}, {}),
    "RMSNorm": ({}, {}),
    "GroupNorm": ({"num_groups": 4}, {}),
    "InstanceNorm": ({}, {}),
}


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(1.5, 2.0, SHAPE), jnp.float32)


def _scales(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)
            if jax.tree_util.keystr(k).endswith("['scale']")}


# One layer of each family by default (they share _Shell._affine), every layer in the slow run.
@pytest.mark.parametrize("name", some_slow(list(LINEN), fast={"BatchNorm", "RMSNorm", "IBN"}))
def test_linen_offset_checkpoint_equals_the_plain_one(name):
    kw, _ = LINEN[name]
    plain, offset = getattr(normzoo, name)(**kw), getattr(normzoo, name)(**kw, scale_plus_one=True)
    x = _x()
    v_plain = plain.init(jax.random.key(0), x)
    v_offset = offset.init(jax.random.key(0), x)
    # Initialized at 0 (scale 1) where flax's would be at 1.
    assert _scales(v_offset["params"]) and all(not np.any(s) for s in _scales(v_offset["params"]).values())
    assert all(np.all(s == 1) for s in _scales(v_plain["params"]).values())
    # A trained-looking scale gamma, stored as gamma in one and gamma - 1 in the other.
    gamma = jax.tree.map(lambda s: jnp.linspace(0.5, 2.0, s.size).reshape(s.shape), v_plain["params"])
    params_plain = jax.tree_util.tree_map_with_path(
        lambda k, p, g: g if jax.tree_util.keystr(k).endswith("['scale']") else p, v_plain["params"], gamma)
    params_offset = jax.tree_util.tree_map_with_path(
        lambda k, p, g: g - 1 if jax.tree_util.keystr(k).endswith("['scale']") else p, v_offset["params"], gamma)

    def loss(layer, params, variables):
        y, _ = layer.apply({**variables, "params": params}, x, mutable=True)
        return jnp.sum(jnp.sin(y)), y

    (_, y_plain), g_plain = jax.value_and_grad(loss, argnums=1, has_aux=True)(plain, params_plain, v_plain)
    (_, y_offset), g_offset = jax.value_and_grad(loss, argnums=1, has_aux=True)(offset, params_offset, v_offset)
    np.testing.assert_allclose(y_offset, y_plain, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_offset, g_plain)


def test_a_custom_scale_init_is_kept():
    layer = normzoo.LayerNorm(scale_plus_one=True, scale_init=nn.initializers.constant(0.25))
    v = layer.init(jax.random.key(0), _x())
    np.testing.assert_array_equal(v["params"]["scale"], 0.25)
    np.testing.assert_allclose(layer.apply(v, _x()), 1.25 * normzoo.LayerNorm().apply(
        {"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}, _x()), rtol=1e-6)


def test_gemma_rms_norm_from_its_checkpoint():
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + 1e-6) * (1 + scale), scale stored (zeros at init)."""
    x = _x(1)[:, 0, 0, :]
    scale = np.random.default_rng(2).normal(0.0, 0.3, 8).astype(np.float32)
    layer = normzoo.RMSNorm(scale_plus_one=True)
    y = layer.apply({"params": {"scale": jnp.asarray(scale)}}, x)
    np.testing.assert_allclose(y, ref.rms_norm(x, (-1,), 1e-6) * (1.0 + np.float64(scale)), rtol=1e-5, atol=1e-6)
    assert jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x)) == {"params": {"scale": (8,)}}


NNX = {
    "BatchNorm": {},
    "BatchRenorm": {},
    "LayerNorm": {},
    "RMSNorm": {},
    "GroupNorm": {"num_groups": 4},
    "InstanceNorm": {},
    "IBN": {},
}


@pytest.mark.parametrize("name", some_slow(list(NNX), fast={"BatchRenorm", "LayerNorm"}))
def test_nnx_offset_layer_equals_its_linen_twin(name):
    """The nnx layer with ``scale_plus_one`` starts at zeros and, given the linen twin's
    variables (offsets), computes what the linen layer computes."""
    x = _x(3)
    layer = getattr(nznnx, name)(8, **NNX[name], scale_plus_one=True, rngs=nnx.Rngs(0))
    scales = jax.tree.leaves(nnx.state(layer, lambda path, v: path[-1] == "scale"))
    assert scales and all(not np.any(s) for s in scales)
    lin_kw = {**LINEN[name][0], **({"use_running_average": False} if "Batch" in name or name == "IBN" else {})}
    twin = getattr(normzoo, name)(**lin_kw, scale_plus_one=True)
    variables = twin.init(jax.random.key(0), x)
    variables = {**variables, "params": jax.tree.map(lambda p: p + 0.3, variables["params"])}
    nznnx.from_linen(layer, variables)
    want, _ = twin.apply(variables, x, mutable=True)
    np.testing.assert_allclose(layer(x), want, rtol=1e-6, atol=1e-6)


def test_registry_passes_the_option_through():
    assert normzoo.make("rms", scale_plus_one=True).norm(train=True).scale_plus_one
    assert nznnx.make("layer", scale_plus_one=True).norm(8, train=True, rngs=nnx.Rngs(0)).scale_plus_one
