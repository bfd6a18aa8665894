"""normzoo.sbx.BatchRenorm against the real sbx package (sbx-rl, the `rl` extra), side by side, and the
one-call switch of sbx's own networks. Skipped, saying why, where sbx is not installed."""

import dataclasses
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import normzoo.sbx
from tests.test_sbx import drifting_batches

sbx_layers = pytest.importorskip(
    "sbx.common.jax_layers",
    reason="sbx-rl is not installed (pip install 'normzoo[rl]'): the side-by-side tests need the real sbx layer")
SbxBatchRenorm = sbx_layers.BatchRenorm
Ours = normzoo.sbx.BatchRenorm


def _fields(cls):
    return [(f.name, f.default, f.kw_only) for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def test_the_released_fields_come_first_in_sbx_order_with_sbx_defaults():
    theirs, ours = _fields(SbxBatchRenorm), _fields(Ours)
    assert ours[: len(theirs)] == theirs
    # What normzoo accepts beyond the released layer: CrossQ's original names and its own options.
    assert [(n, kw) for n, _, kw in ours[len(theirs):]] == [("use_fast_variance", False), ("warm_up_steps", True),
                                                            ("virtual_batch_size", True)]


@pytest.mark.parametrize("shape,axis", [((256, 16), -1), ((32, 4, 16), -1), ((8, 4, 4, 16), 1)])
def test_init_and_eight_steps_across_the_warmup_switch_equal_sbx(shape, axis):
    x0 = next(drifting_batches(1, shape))
    theirs, ours = SbxBatchRenorm(use_running_average=False, warmup_steps=4, axis=axis), \
        Ours(use_running_average=False, warmup_steps=4, axis=axis)
    v_theirs, v_ours = theirs.init(jax.random.key(0), x0), ours.init(jax.random.key(0), x0)
    # The same variables, down to the Python ints sbx keeps for r_max, d_max and steps.
    assert jax.tree.map(lambda a: (type(a).__name__, np.shape(a)), v_ours) == \
        jax.tree.map(lambda a: (type(a).__name__, np.shape(a)), v_theirs)
    jax.tree.map(np.testing.assert_array_equal, v_ours, v_theirs)
    w = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)

    def step(layer, variables, x):
        def loss(params, x):
            y, upd = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(y) * w), (y, upd["batch_stats"])
        (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], x)
        return y, stats, grads

    for t, x in enumerate(drifting_batches(8, shape, seed=2)):  # r and d switch on after 4 steps
        y0, s0, g0 = jax.jit(lambda v, x: step(theirs, v, x))(v_theirs, x)
        y1, s1, g1 = jax.jit(lambda v, x: step(ours, v, x))(v_ours, x)
        np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4, err_msg=f"step {t}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), s1, s0)
        v_theirs, v_ours = {**v_theirs, "batch_stats": s0}, {**v_ours, "batch_stats": s1}
    assert int(v_ours["batch_stats"]["steps"]) == 8
    x = next(drifting_batches(1, shape, seed=9))
    np.testing.assert_allclose(Ours(use_running_average=True, axis=axis).apply(v_ours, x),
                               SbxBatchRenorm(use_running_average=True, axis=axis).apply(v_theirs, x), rtol=1e-5, atol=1e-5)


def test_checkpoints_move_both_ways_through_flax_serialization():
    x = next(drifting_batches(1, (64, 8)))
    theirs, ours = SbxBatchRenorm(use_running_average=False, warmup_steps=0), Ours(use_running_average=False, warmup_steps=0)
    v = theirs.init(jax.random.key(0), x)
    _, upd = theirs.apply(v, x, mutable=["batch_stats"])
    trained = {**v, **upd}
    loaded = serialization.from_bytes(ours.init(jax.random.key(1), x), serialization.to_bytes(trained))
    back = serialization.from_bytes(v, serialization.to_bytes(loaded))
    jax.tree.map(np.testing.assert_array_equal, back, trained)
    x2 = next(drifting_batches(1, (64, 8), seed=3))
    np.testing.assert_allclose(ours.apply(loaded, x2, mutable=["batch_stats"])[0],
                               theirs.apply(trained, x2, mutable=["batch_stats"])[0], rtol=1e-5, atol=1e-5)


def _layer_types(fn):
    seen = set()

    def record(next_fun, args, kwargs, context):
        if type(context.module).__name__ == "BatchRenorm":
            seen.add(type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        out = fn()
    return out, seen


def test_the_switch_puts_normzoo_in_sbx_networks_and_undoes_it():
    from sbx.crossq import policies

    obs, act = jnp.ones((16, 3)), jnp.ones((16, 1))
    critic = policies.VectorCritic(net_arch=[32, 32], renorm_warmup_steps=0)
    actor = policies.Actor(net_arch=[32, 32], action_dim=1, renorm_warmup_steps=0)
    v_critic, stock = _layer_types(lambda: critic.init(jax.random.key(0), obs, act, train=True))
    assert stock == {SbxBatchRenorm}
    with normzoo.sbx.use_in_sbx() as switch:
        assert {"sbx.crossq.policies", "sbx.common.jax_layers"} <= set(switch.modules)
        (y_ours, _), used = _layer_types(lambda: critic.apply(v_critic, obs, act, train=True, mutable=["batch_stats"]))
        assert used == {Ours}
        v_actor_ours, used = _layer_types(lambda: actor.init(jax.random.key(1), obs))
        assert used == {Ours}
    assert policies.BatchRenorm is SbxBatchRenorm and sbx_layers.BatchRenorm is SbxBatchRenorm  # undone
    y_sbx, _ = critic.apply(v_critic, obs, act, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_sbx, rtol=1e-5, atol=1e-5)  # the same variables, the same numbers
    v_actor_sbx = actor.init(jax.random.key(1), obs)
    jax.tree.map(np.testing.assert_array_equal, v_actor_ours, v_actor_sbx)
    switch.undo()  # idempotent


def test_the_switch_says_so_when_sbx_is_not_installed(monkeypatch):
    for name in [m for m in sys.modules if m == "sbx" or m.startswith("sbx.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sbx", None)  # `import sbx` fails as if it were absent
    with pytest.raises(ModuleNotFoundError, match=r"normzoo.sbx.use_in_sbx: sbx is not installed.*"
                                                  r"pip install 'normzoo\[rl\]'"):
        normzoo.sbx.use_in_sbx()


@pytest.mark.slow  # a real CrossQ run: gymnasium's Pendulum, 300 environment steps
def test_crossq_on_pendulum_trains_with_the_switch():
    pytest.importorskip("gymnasium", reason="gymnasium is not installed (pip install 'normzoo[rl]')")
    from sbx import CrossQ

    with normzoo.sbx.use_in_sbx():
        model = CrossQ("MlpPolicy", "Pendulum-v1", learning_starts=100, policy_kwargs={"net_arch": [32, 32]},
                       seed=0, verbose=0)
        _, used = _layer_types(lambda: model.learn(300))
    assert used == {Ours}
    steps = [np.asarray(a) for path, a in jax.tree_util.tree_flatten_with_path(model.policy.qf_state.batch_stats)[0]
             if path[-1].key == "steps"]
    assert steps and all((s >= 200).all() for s in steps)  # training steps counted by our layer, per critic
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(model.policy.qf_state.params))


@pytest.mark.slow  # three short CrossQ runs on Pendulum (the example's code path, small)
def test_the_pendulum_example_measures_drift_returns_and_time(tmp_path):
    pytest.importorskip("gymnasium", reason="gymnasium is not installed (pip install 'normzoo[rl]')")
    from examples.crossq import sbx_pendulum

    results = sbx_pendulum.main(["--steps", "300", "--chunk", "100", "--learning-starts", "100",
                                 "--warmup", "50", "--net-arch", "16", "16", "--timing-steps", "50",
                                 "--timing-rounds", "1", "--out", str(tmp_path)])
    updates = results["updates"]
    assert updates[:3] == [0, 0, 10] and updates[-1] == 200  # snapshots every 10 updates after learning starts
    ours, control = np.array(results["drift_normzoo_vs_sbx"]), np.array(results["drift_sbx_stable_vs_sbx"])
    assert len(ours) == len(control) == len(updates)
    # The same seed gives the same critic until learning starts; then the runs part by float32 rounding,
    # and as fast with normzoo's layer as with sbx's own layer given only a stable variance.
    np.testing.assert_array_equal(ours[:2], 0.0)
    np.testing.assert_array_equal(control[:2], 0.0)
    assert (ours[2:] > 0).all() and ours[2] < 1e-6
    np.testing.assert_array_less(ours[2:] / control[2:], 10.0)
    np.testing.assert_array_less(control[2:] / ours[2:], 10.0)
    assert set(results["returns"]) == {"sbx", "normzoo", "sbx_stable"}
    assert all([s for s, _ in r] == [60, 120, 180, 240, 300] for r in results["returns"].values())
    assert all(np.isfinite([v for _, v in r]).all() for r in results["returns"].values())
    assert all(t > 0 for t in results["train_seconds"].values())
    assert results["interleaved_seconds"].keys() == results["returns"].keys()
    assert (tmp_path / "sbx_pendulum.md").read_text().splitlines()[2].startswith("| sbx | ")


def test_large_means_cost_sbx_its_variance_and_normzoo_nothing():
    from examples.crossq import sbx_large_mean

    rows = {r["offset"]: r for r in sbx_large_mean.measure(offsets=(0.0, 100.0, 1e4))}
    for r in rows.values():  # normzoo's variance keeps float32 precision whatever the mean
        assert r["normzoo_variance"] < 1e-6 and r["normzoo_output"] < 1e-3
    # Centred data: both formulas agree to rounding; sbx's fast formula loses digits as the mean grows.
    assert rows[0.0]["sbx_variance"] < 1e-6 and rows[0.0]["sbx_output"] < 1e-6
    assert rows[100.0]["sbx_variance"] > 1e-4
    assert rows[1e4]["sbx_variance"] > 1.0  # off by more than 100%: the stored variance is wrong
    assert "| 10000 + N(0, 1) |" in sbx_large_mean.table(list(rows.values()))


@pytest.mark.slow  # the RL guide's sbx snippet trains CrossQ for a few hundred steps
def test_the_rl_guide_sbx_snippets_run():
    pytest.importorskip("gymnasium", reason="gymnasium is not installed (pip install 'normzoo[rl]')")
    from tests.test_docs import DOCS
    from tests.test_readme import optional_package, python_blocks, run_blocks

    blocks = [b for b in python_blocks(DOCS / "guides" / "rl.md") if optional_package(b) == "sbx"]
    assert blocks, "the RL guide shows how to switch sbx's CrossQ"
    namespace = run_blocks(blocks, "docs/guides/rl.md sbx")
    assert namespace["model"].num_timesteps >= 300
    assert normzoo.sbx.BatchRenorm is not sbx_layers.BatchRenorm and sbx_layers.BatchRenorm is SbxBatchRenorm
