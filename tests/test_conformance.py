"""Every registry name in a small conv model: jit == eager, bf16, gradients, eval_shape."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from tests.conftest import some_slow


class TinyNet(nn.Module):
    norm: str
    dtype: object = None

    @nn.compact
    def __call__(self, x, train: bool):
        kw = {} if self.dtype is None else {"dtype": self.dtype}
        spec = normzoo.make(self.norm, **kw)
        norm = functools.partial(spec.norm, train=train)
        x = spec.conv(8, (3, 3), **kw)(x)
        x = nn.relu(norm()(x))
        x = spec.conv(8, (3, 3), strides=2, **kw)(x)
        x = nn.relu(spec.late_norm(train=train)(x))
        return spec.dense(3, **kw)(x.mean((1, 2)))


@pytest.fixture(scope="module")
def batch():
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32) + 2.0
    return jnp.asarray(x)


def _run(model, variables, x, train):
    # rngs: noisy_batch's noise stream (the same key every call, so eager and jitted runs agree).
    return model.apply(variables, x, train=train, mutable=["batch_stats"], rngs={"noise": jax.random.key(7)})


# A batch-statistics name by default; every name in the slow run (the NNX, CIFAR and deployment
# tests run the others in whole models too).
@pytest.mark.parametrize("name", some_slow(normzoo.available(), fast={"batch"}))
def test_every_registry_name_in_a_model(name, batch):
    """jit == eager, finite non-zero gradients, bf16 in gives bf16 out with float32 variables
    and statistics, and eval_shape agrees with init: one model per name."""
    model = TinyNet(name)
    variables = model.init(jax.random.key(0), batch, train=True)
    run = jax.jit(functools.partial(_run, model), static_argnums=2)
    eager, eager_upd = _run(model, variables, batch, True)  # not jitted as a whole
    jitted, jit_upd = run(variables, batch, True)
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), eager_upd, jit_upd)
    assert np.all(np.isfinite(run(variables, batch, False)[0]))

    def loss(params):
        y, _ = _run(model, {**variables, "params": params}, batch, True)
        return jnp.mean(y**2)

    grads = jax.tree.leaves(jax.jit(jax.grad(loss))(variables["params"]))
    assert grads and all(np.all(np.isfinite(g)) for g in grads)
    assert any(np.any(g != 0) for g in grads)

    half = TinyNet(name, dtype=jnp.bfloat16)
    y, upd = jax.jit(functools.partial(_run, half), static_argnums=2)(variables, batch.astype(jnp.bfloat16), True)
    assert y.dtype == jnp.bfloat16
    assert all(s.dtype in (jnp.float32, jnp.int32) for s in jax.tree.leaves(upd))
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    np.testing.assert_allclose(np.asarray(y, np.float32), jitted, atol=0.15, rtol=0.1)

    shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), batch)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(lambda a: (a.shape, a.dtype), variables)
    assert jax.eval_shape(functools.partial(_run, model, train=False), variables, batch)[0].shape == (4, 3)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(half.init(jax.random.key(0), batch.astype(jnp.bfloat16), train=True)["params"]))
