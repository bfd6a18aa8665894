"""Synced statistics on 8 simulated devices: pmap, shard_map and jit with NamedSharding
all equal a single-device run on the global batch."""

import functools
import os
import re
import socket
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import normzoo
from tests import reference as ref
from tests.conftest import some_slow

D = 8
AXIS = "batch"
pytestmark = pytest.mark.skipif(jax.device_count() < D, reason="needs 8 (simulated) devices")

LAYERS = {
    "batch": lambda **kw: normzoo.BatchNorm(use_running_average=False, momentum=0.7, **kw),
    "batch_renorm": lambda **kw: normzoo.BatchRenorm(use_running_average=False, r_max=1.5, d_max=0.5, warmup_steps=0, **kw),
    "ibn": lambda **kw: normzoo.IBN(use_running_average=False, ratio=0.5, **kw),
    "sbx_batch_renorm": lambda **kw: normzoo.sbx.BatchRenorm(use_running_average=False, warmup_steps=0, **kw),
    "evonorm_b0": lambda **kw: normzoo.EvoNormB0(use_running_average=False, momentum=0.7, **kw),
}


def _global_batch(seed=0, shape=(32, 4, 4, 6), loc=1.0):
    r = np.random.default_rng(seed)
    return r.normal(size=shape).astype(np.float32) * 2 + np.float32(loc), r.normal(size=shape).astype(np.float32)


def _step(layer, variables, x, w, axis_name=None):
    """Forward, updated batch_stats, param grads (summed over devices) and input grads.

    ``axis_name`` psums the parameter gradients, as pmap needs; under shard_map the
    gradient of a replicated (P()) input is already summed by JAX, so pass None there.
    """

    def loss(params, x):
        y, upd = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * w), (y, upd)

    (_, (y, upd)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    if axis_name is not None:
        gp = lax.psum(gp, axis_name)
    return y, upd, gp, gx


def _renorm_stats(variables, x):
    """Give BatchRenorm non-trivial running statistics so that r and d are active."""
    if "steps" not in variables["batch_stats"]:
        return variables
    c = x.shape[-1]
    bs = {**variables["batch_stats"], "mean": jnp.full(c, 0.7), "var": jnp.full(c, 6.0), "steps": jnp.array(0, jnp.int32)}
    return {**variables, "batch_stats": bs}


def _reference(name, x, w):
    layer = LAYERS[name]()
    variables = _renorm_stats(layer.init(jax.random.key(0), x), x)
    return variables, jax.jit(functools.partial(_step, layer))(variables, x, w)


def _assert_same(got, want, rtol=1e-5, atol=1e-5):
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


# pmap is the legacy mapper: one batch-statistics layer and IBN by default (both renorms run
# under shard_map and jit below), every layer in the slow run.
@pytest.mark.parametrize("name", some_slow(sorted(LAYERS), fast={"batch", "ibn"}))
def test_pmap_equals_global_batch(name, stats_path):
    x, w = _global_batch()
    variables, (y0, u0, gp0, gx0) = _reference(name, x, w)
    layer = LAYERS[name](axis_name=AXIS)
    shard = lambda a: a.reshape((D, -1) + a.shape[1:])  # noqa: E731
    rep = jax.tree.map(lambda a: jnp.stack([a] * D), variables)
    y, upd, gp, gx = jax.pmap(functools.partial(_step, layer, axis_name=AXIS), axis_name=AXIS)(rep, shard(x), shard(w))
    _assert_same(y.reshape(x.shape), y0)
    _assert_same(gx.reshape(x.shape), gx0)
    _assert_same(jax.tree.map(lambda a: a[0], gp), gp0, rtol=1e-4)
    # Every replica holds identical running statistics, equal to the global ones.
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape)), upd)
    _assert_same(jax.tree.map(lambda a: a[0], upd), u0, rtol=1e-6)


def _mesh():
    return jax.make_mesh((D,), (AXIS,))


# EvoNorm-B0 shares BatchNorm's synced statistics: in the slow run.
@pytest.mark.parametrize("name", some_slow(sorted(LAYERS), fast=set(LAYERS) - {"evonorm_b0"}))
def test_shard_map_equals_global_batch(name, stats_path):
    x, w = _global_batch(1)
    variables, (y0, u0, gp0, gx0) = _reference(name, x, w)
    layer = LAYERS[name](axis_name=AXIS)
    mesh = _mesh()
    f = jax.jit(jax.shard_map(
        lambda v, x, w: _step(layer, v, x, w),
        mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(), P(), P(AXIS)),
    ))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS)))  # noqa: E731
    y, upd, gp, gx = f(variables, put(x), put(w))
    _assert_same((y, gx), (y0, gx0))
    _assert_same(gp, gp0, rtol=1e-4)
    _assert_same(upd, u0, rtol=1e-6)


@pytest.mark.parametrize("name", some_slow(sorted(LAYERS), fast=set(LAYERS) - {"evonorm_b0"}))
def test_jit_with_named_sharding_equals_global_batch(name, stats_path):
    """The modern path: no axis_name; the compiler reduces across the sharded batch."""
    x, w = _global_batch(2)
    variables, (y0, u0, gp0, gx0) = _reference(name, x, w)
    mesh = _mesh()
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS)))  # noqa: E731
    xs, ws = put(x), put(w)
    assert len(xs.sharding.device_set) == D
    y, upd, gp, gx = jax.jit(functools.partial(_step, LAYERS[name]()))(variables, xs, ws)
    assert len(y.sharding.device_set) == D
    _assert_same((y, gx), (y0, gx0))
    _assert_same(gp, gp0, rtol=1e-4)
    _assert_same(upd, u0, rtol=1e-6)


COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\(")


def count_collectives(hlo_text):
    return len(COLLECTIVE.findall(hlo_text))


# BatchRenorm's and sbx's layer share BatchNorm's one reduction: they count in the slow run.
@pytest.mark.parametrize("name,per_call", some_slow([("batch", 1), ("batch_renorm", 1), ("ibn", 1), ("sbx_batch_renorm", 1)],
                                                    fast={("batch", 1), ("ibn", 1)}))
def test_one_collective_per_synced_call_in_the_forward_pass(name, per_call, stats_path):
    x, _ = _global_batch()
    layer = LAYERS[name](axis_name=AXIS)
    variables = layer.init(jax.random.key(0), x[:4])
    fwd = jax.pmap(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]), axis_name=AXIS, in_axes=(None, 0))
    hlo = fwd.lower(variables, x.reshape((D, -1) + x.shape[1:])).compile().as_text()
    assert count_collectives(hlo) == per_call, COLLECTIVE.findall(hlo)

    class Two(nn.Module):  # two synced layers: two collectives
        @nn.compact
        def __call__(self, x):
            return LAYERS[name](axis_name=AXIS)(LAYERS[name](axis_name=AXIS)(x))

    v2 = Two().init(jax.random.key(0), x[:4])
    hlo2 = jax.pmap(lambda v, x: Two().apply(v, x, mutable=["batch_stats"]), axis_name=AXIS, in_axes=(None, 0)).lower(
        v2, x.reshape((D, -1) + x.shape[1:])).compile().as_text()
    assert count_collectives(hlo2) == 2 * per_call


def test_large_mean_across_8_devices_within_1e_2_of_float64(stats_path):
    x, _ = _global_batch(3, (64, 8, 8, 16), loc=1e4)
    layer = normzoo.BatchNorm(use_running_average=False, axis_name=AXIS)
    v = layer.init(jax.random.key(0), x[:8])
    y, upd = jax.pmap(lambda x: layer.apply(v, x, mutable=["batch_stats"]), axis_name=AXIS)(x.reshape(D, 8, 8, 8, 16))
    err = np.abs(np.asarray(y).reshape(x.shape) - ref.batch_norm(x, (0, 1, 2), 1e-5)).max()
    assert err < 1e-2
    np.testing.assert_allclose(upd["batch_stats"]["var"][0], 0.99 + 0.01 * ref.f64(x).var((0, 1, 2)), rtol=1e-4)


def test_masked_statistics_weight_devices_by_their_valid_counts(stats_path):
    """Union of valid elements, not the average of per-device means (flax issue 2417)."""
    x, _ = _global_batch(4, (64, 5))
    x[:, 0] += np.repeat(np.arange(D, dtype=np.float32) * 10, 8)  # device means differ a lot
    valid = np.zeros((D, 8), bool)
    for d in range(D):
        valid[d, : d % 4] = True  # 0, 1, 2 or 3 valid examples per device; device 0 has none
    mask = valid.reshape(64, 1)
    layer = normzoo.BatchNorm(use_running_average=False, momentum=0.0, axis_name=AXIS)
    v = layer.init(jax.random.key(0), x[:8])
    y, upd = jax.pmap(
        lambda x, m: layer.apply(v, x, mask=m, mutable=["batch_stats"]), axis_name=AXIS
    )(x.reshape(D, 8, 5), jnp.asarray(mask.reshape(D, 8, 1)))
    want, mu, var = ref.masked_batch_norm(x, mask, (0,), 1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"][0], mu.ravel(), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"][0], var.ravel(), rtol=1e-5)
    keep = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape)[keep], want[keep], atol=2e-5)
    naive = np.mean([x[d * 8:(d + 1) * 8][valid[d]].mean(0) for d in range(D) if valid[d].any()], 0)
    assert np.abs(naive - mu.ravel()).max() > 1.0  # the averaged means would be visibly wrong


@pytest.mark.parametrize("mapper", ["pmap", "shard_map"])
def test_axis_index_groups_sync_within_each_group(mapper, stats_path):
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    x, _ = _global_batch(5)
    layer = normzoo.BatchNorm(use_running_average=False, momentum=0.0, axis_name=AXIS, axis_index_groups=groups)
    v = layer.init(jax.random.key(0), x[:4])
    apply = lambda x: layer.apply(v, x, mutable=["batch_stats"])  # noqa: E731
    if mapper == "pmap":
        y, upd = jax.pmap(apply, axis_name=AXIS)(x.reshape((D, 4) + x.shape[1:]))
        y, means = np.asarray(y).reshape(x.shape), np.asarray(upd["batch_stats"]["mean"])
    else:
        mesh = _mesh()
        f = jax.jit(jax.shard_map(
            lambda x: jax.tree.map(lambda a: a[None] if a.ndim == 1 else a, apply(x)),
            mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False,
        ))
        y, upd = f(jax.device_put(x, NamedSharding(mesh, P(AXIS))))
        y, means = np.asarray(y), np.asarray(upd["batch_stats"]["mean"])
    for g, half in enumerate((slice(0, 16), slice(16, 32))):
        np.testing.assert_allclose(y[half], ref.batch_norm(x[half], (0, 1, 2), 1e-5), atol=2e-5)
        for d in groups[g]:
            np.testing.assert_allclose(means[d], ref.f64(x[half]).mean((0, 1, 2)), rtol=1e-5)


def test_ghost_batches_with_sync_keep_replicas_identical(stats_path):
    x, _ = _global_batch(6)
    layer = normzoo.BatchNorm(use_running_average=False, momentum=0.0, axis_name=AXIS, virtual_batch_size=2)
    v = layer.init(jax.random.key(0), x[:4])
    y, upd = jax.pmap(lambda x: layer.apply(v, x, mutable=["batch_stats"]), axis_name=AXIS)(
        x.reshape((D, 4) + x.shape[1:]))
    ghosts = x.reshape((16, 2) + x.shape[1:])
    want = np.concatenate([ref.batch_norm(g, (0, 1, 2), 1e-5) for g in ghosts])
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape), want, atol=2e-5)
    means = np.asarray(upd["batch_stats"]["mean"])
    np.testing.assert_array_equal(means, np.broadcast_to(means[0], means.shape))
    np.testing.assert_allclose(means[0], np.mean([ref.f64(g).mean((0, 1, 2)) for g in ghosts], 0), rtol=1e-5)


def test_sync_batch_stats_averages_unsynced_replicas():
    x, _ = _global_batch(7)
    layer = normzoo.BatchRenorm(use_running_average=False)  # no axis_name: replicas drift
    v = layer.init(jax.random.key(0), x[:4])

    def step(x):
        _, upd = layer.apply(v, x, mutable=["batch_stats"])
        return upd["batch_stats"], normzoo.sync_batch_stats(upd["batch_stats"], AXIS)

    local, synced = jax.pmap(step, axis_name=AXIS)(x.reshape((D, 4) + x.shape[1:]))
    assert not np.allclose(local["mean"][0], local["mean"][1])
    for k in ("mean", "var"):
        np.testing.assert_allclose(synced[k], np.broadcast_to(np.asarray(local[k]).mean(0), synced[k].shape), rtol=1e-6)
    np.testing.assert_array_equal(synced["steps"], np.ones(D))
    hlo = jax.pmap(lambda s: normzoo.sync_batch_stats(s, AXIS), axis_name=AXIS).lower(local).compile().as_text()
    assert count_collectives(hlo) == 2  # one for every float leaf together, one for the int counters


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_sync_like_one():
    """2 processes x 4 CPU devices with jax.distributed: synced BN equals the global batch."""
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(i), port], cwd=root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "OK" in out, out[-3000:]


class _Block(nn.Module):
    """A ResNet basic block (flax's ImageNet example's), the normalizer a factory."""

    features: int
    strides: int
    norm: object

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm()(nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)))
        y = self.norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if x.shape != y.shape:
            x = self.norm()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class _ResNet(nn.Module):
    norm: object

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        x = _Block(8, 1, self.norm)(x)
        x = _Block(16, 2, self.norm)(x)
        return nn.Dense(10)(jnp.mean(x, (1, 2)))


def _all_reduces_of_a_synced_sgd_step(norm_cls, **kw):
    """(forward, whole step) all-reduces in the compiled HLO of one SGD step under shard_map on 8
    devices: batch-sharded data, replicated parameters (JAX sums their gradients)."""
    model = _ResNet(functools.partial(norm_cls, use_running_average=False, axis_name=AXIS, **kw))
    x, y = jnp.ones((16, 8, 8, 3)), jnp.zeros((16,), jnp.int32)
    v = _ResNet(functools.partial(norm_cls, use_running_average=False, **kw)).init(jax.random.key(0), x[:2])
    mesh = jax.sharding.Mesh(jax.devices()[:D], (AXIS,))

    def loss(params, x, y):
        out, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
        return lax.pmean(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], 1)), AXIS), upd

    def step(params, x, y):
        (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), upd, value

    counts = []
    for fn, out_specs in ((loss, (P(), P())), (step, (P(), P(), P()))):
        compiled = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=out_specs))
        hlo = compiled.lower(v["params"], x, y).compile().as_text()
        counts.append(len(re.findall(r"\ball-reduce(-start)?\(", hlo)))
    return counts


@pytest.mark.parametrize("with_stable", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_synced_resnet_step_makes_no_more_all_reduces_than_flax(with_stable):
    """Forward: one all-reduce per normalizer, as flax's default (fast, unstable) variance; flax's
    stable variance takes two (compiled in the slow run). Whole step (forward and backward): no
    more than flax's default."""
    n_norms = 1 + 2 + 3
    ours_fwd, ours = _all_reduces_of_a_synced_sgd_step(normzoo.BatchNorm)
    flax_default_fwd, flax_default = _all_reduces_of_a_synced_sgd_step(nn.BatchNorm)
    assert ours_fwd == flax_default_fwd and n_norms <= ours_fwd <= n_norms + 1  # the loss's may merge
    assert ours <= flax_default, (ours, flax_default)
    if with_stable:
        flax_stable_fwd, flax_stable = _all_reduces_of_a_synced_sgd_step(nn.BatchNorm, use_fast_variance=False)
        assert flax_stable_fwd == flax_default_fwd + n_norms  # flax's stable mode: a second one per layer
        assert flax_default < flax_stable, (flax_default, flax_stable)
