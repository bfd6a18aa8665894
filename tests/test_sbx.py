"""normzoo.sbx.BatchRenorm against an sbx-style layer written from sbx's published formula
(``benchmarks/sbx_style.py``: the formula is in its docstring)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import normzoo
from benchmarks.sbx_style import SbxStyle
from normzoo.sbx import BatchRenorm

# sbx's fields, in sbx's order, with sbx's defaults, then use_fast_variance (CrossQ's original code has it;
# no released sbx-rl does: tests/test_sbx_real.py checks the fields against the installed package).
SBX_FIELDS = [("use_running_average", None), ("axis", -1), ("momentum", 0.99), ("epsilon", 1e-3),
              ("warmup_steps", 100_000), ("dtype", None), ("param_dtype", jnp.float32), ("use_bias", True),
              ("use_scale", True), ("bias_init", nn.initializers.zeros), ("scale_init", nn.initializers.ones),
              ("axis_name", None), ("axis_index_groups", None), ("use_fast_variance", True)]


# Synced statistics (pmap, shard_map, jit with sharding, one collective) are tested with the other
# batch-statistics layers in test_multidevice.py ("sbx_batch_renorm").


def drifting_batches(steps, shape=(256, 64), seed=0):
    """Critic-like inputs whose distribution drifts each step, so r and d leave (1, 0) and clip."""
    rng = np.random.default_rng(seed)
    loc, sd = rng.normal(0, 1, shape[-1]), rng.uniform(0.5, 2, shape[-1])
    for t in range(steps):
        yield jnp.asarray(rng.normal(loc + 0.8 * t, sd * (1 + 0.5 * t), shape), jnp.float32)


def test_fields_are_sbx_fields_in_sbx_order_with_sbx_defaults():
    fields = [f for f in dataclasses.fields(BatchRenorm) if f.name not in ("parent", "name")]
    positional = [(f.name, f.default) for f in fields if not f.kw_only]
    assert positional == SBX_FIELDS
    assert {f.name for f in fields if f.kw_only} == {"warm_up_steps", "virtual_batch_size"}
    assert BatchRenorm(None, -1, 0.9, 1e-2, 7).warmup_steps == 7  # positional as in sbx


@pytest.mark.parametrize("alias", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["warmup_steps", "warm_up_steps"])
def test_same_outputs_statistics_and_gradients_as_sbx_across_the_warmup_switch(alias, stats_path):
    ours = BatchRenorm(use_running_average=False, **({"warm_up_steps": 3} if alias else {"warmup_steps": 3}))
    theirs = SbxStyle(warmup_steps=3)
    batches = list(drifting_batches(7))
    variables = theirs.init(jax.random.key(0), batches[0])
    np.testing.assert_equal(jax.device_get(ours.init(jax.random.key(0), batches[0])), jax.device_get(variables))
    w = jax.random.normal(jax.random.key(1), batches[0].shape)

    def step(layer, variables, x):
        def loss(params, x):
            y, upd = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(y) * w), (y, upd)
        (_, (y, upd)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return y, upd["batch_stats"], grads

    switched = False
    for t, x in enumerate(batches):
        y0, s0, g0 = step(theirs, variables, x)
        y1, s1, g1 = step(ours, variables, x)
        np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {t}"), s1, s0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=f"step {t}"), g1, g0)
        # After the switch the renormalized output differs from plain BatchNorm's.
        bn = normzoo.BatchNorm(use_running_average=False, epsilon=1e-3).apply(
            {"params": variables["params"], "batch_stats": {k: variables["batch_stats"][k] for k in ("mean", "var")}},
            x, mutable=["batch_stats"])[0]
        if t < 3:
            np.testing.assert_allclose(y1, bn, rtol=1e-5, atol=1e-5)
        else:
            switched = switched or not np.allclose(y1, bn, atol=1e-2)
        variables = {**variables, "batch_stats": s0}
    assert switched and int(variables["batch_stats"]["steps"]) == 7
    # The eval path with the statistics both trained.
    x = batches[-1]
    np.testing.assert_allclose(BatchRenorm(use_running_average=True).apply(variables, x),
                               SbxStyle(use_running_average=True).apply(variables, x), rtol=1e-5, atol=1e-5)


def test_checkpoints_move_between_sbx_and_normzoo():
    x = next(drifting_batches(1))
    theirs, ours = SbxStyle(warmup_steps=1), BatchRenorm(use_running_average=False, warmup_steps=1)
    trained = theirs.init(jax.random.key(0), x)
    for x in drifting_batches(3, seed=1):
        _, upd = theirs.apply(trained, x, mutable=["batch_stats"])
        trained = {**trained, **upd}
    # Custom bounds stored in the checkpoint are honoured (sbx reads them from batch_stats too).
    trained["batch_stats"] = {**trained["batch_stats"], "r_max": 2, "d_max": 1}
    blob = serialization.to_bytes(trained)
    loaded = serialization.from_bytes(ours.init(jax.random.key(5), x), blob)
    jax.tree.map(np.testing.assert_array_equal, loaded, trained)
    y_ours, upd_ours = ours.apply(loaded, x, mutable=["batch_stats"])
    y_theirs, upd_theirs = theirs.apply(trained, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    # ... and ours load back into theirs.
    back = serialization.from_bytes(theirs.init(jax.random.key(6), x),
                                    serialization.to_bytes({**loaded, **upd_ours}))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), back, {**trained, **upd_theirs})


def test_a_constant_feature_gets_finite_gradients():
    # A dead ReLU unit: the feature is 0 for the whole batch, its running mean 0, so d = 0 and
    # sbx's sqrt(var_B) has an infinite derivative at 0 (0 * inf = NaN there); ours is 0.
    x = jnp.concatenate([next(drifting_batches(1, (64, 3))), jnp.zeros((64, 1))], 1)
    layer = BatchRenorm(use_running_average=False, warmup_steps=0)
    v = layer.init(jax.random.key(0), x)
    g = jax.grad(lambda p, x: jnp.sum(layer.apply({**v, "params": p}, x, mutable=["batch_stats"])[0] ** 3),
                 argnums=(0, 1))(v["params"], x)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))
    g_sbx = jax.grad(lambda x: jnp.sum(SbxStyle(warmup_steps=0).apply(v, x, mutable=["batch_stats"])[0] ** 3))(x)
    assert np.isnan(g_sbx[:, 3]).all() and np.isfinite(g_sbx[:, :3]).all()  # why the difference


def test_masked_statistics_are_those_of_the_valid_rows(stats_path):
    x = next(drifting_batches(1, (32, 8)))
    keep = np.arange(32) % 3 != 0
    layer = BatchRenorm(use_running_average=False, warmup_steps=0)
    v = layer.init(jax.random.key(0), x)
    v = {**v, "batch_stats": {**v["batch_stats"], "mean": jnp.full(8, 0.5), "var": jnp.full(8, 2.0)}}
    y_mask, s_mask = layer.apply(v, x, mask=jnp.asarray(keep)[:, None], mutable=["batch_stats"])
    y_sub, s_sub = layer.apply(v, x[keep], mutable=["batch_stats"])
    np.testing.assert_allclose(y_mask[keep], y_sub, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_mask, s_sub)


def test_ghost_batches_are_separate_statistics():
    x = next(drifting_batches(1, (16, 4)))
    layer = BatchRenorm(use_running_average=False, warmup_steps=0, virtual_batch_size=8)
    v = layer.init(jax.random.key(0), x)
    y, _ = layer.apply(v, x, mutable=["batch_stats"])
    for half in (slice(0, 8), slice(8, 16)):
        y_half, _ = BatchRenorm(use_running_average=False, warmup_steps=0).apply(v, x[half], mutable=["batch_stats"])
        np.testing.assert_allclose(y[half], y_half, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "step"])
def test_init_output_is_batch_norm_as_in_sbx(schedule):
    # Under init there are no running statistics yet: no r or d, whatever the schedule (sbx: the same).
    x = next(drifting_batches(1, (32, 8))) * 4.0 + 3.0
    bn = normzoo.BatchNorm(use_running_average=False, epsilon=1e-3).init_with_output(jax.random.key(0), x)[0]
    ours = normzoo.BatchRenorm(use_running_average=False, epsilon=1e-3, warmup_steps=0, warmup_schedule=schedule)
    np.testing.assert_allclose(ours.init_with_output(jax.random.key(0), x)[0], bn, rtol=1e-6, atol=1e-6)
    sbx = BatchRenorm(use_running_average=False, warmup_steps=0).init_with_output(jax.random.key(0), x)[0]
    np.testing.assert_allclose(sbx, SbxStyle(warmup_steps=0).init_with_output(jax.random.key(0), x)[0], rtol=1e-5, atol=1e-5)


def test_warmup_steps_from_a_config_file_may_be_a_float():
    x = next(drifting_batches(1, (16, 4)))
    v = BatchRenorm(use_running_average=False).init(jax.random.key(0), x)
    v = {**v, "batch_stats": {**v["batch_stats"], "steps": 2, "mean": jnp.full(4, 9.0)}}
    for warmup, renormalized in ((2.0, True), (2e5, False)):
        y = BatchRenorm(use_running_average=False, warmup_steps=warmup).apply(v, x, mutable=["batch_stats"])[0]
        z = SbxStyle(warmup_steps=int(warmup)).apply(v, x, mutable=["batch_stats"])[0]
        np.testing.assert_allclose(y, z, rtol=1e-5, atol=1e-5)
        assert renormalized == (not np.allclose(y, normzoo.BatchNorm(use_running_average=False, epsilon=1e-3).apply(
            {"params": v["params"], "batch_stats": {"mean": v["batch_stats"]["mean"], "var": v["batch_stats"]["var"]}},
            x, mutable=["batch_stats"])[0], atol=1e-3))
