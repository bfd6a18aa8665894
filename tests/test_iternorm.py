"""IterNorm (Huang et al. 2019): functional, linen and nnx, against float64 NumPy (the paper's
Newton-Schulz iteration and exact ZCA by eigendecomposition), running statistics, masks, groups,
gradients, dtypes, large means, constant channels, errors, the registry, fold and 8 devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import normzoo
from normzoo import deploy
from normzoo import functional as F
from normzoo import nnx as nznnx
from tests import reference as ref
from tests.conftest import some_slow

RNG = np.random.default_rng(0)
# Jitted: one compilation per case instead of one per operation (the default run stays short).
_iter_norm = jax.jit(F.iter_norm, static_argnames=("training", "group_size", "iterations", "momentum", "epsilon",
                                                   "axis", "axis_name", "axis_index_groups", "virtual_batch_size",
                                                   "dtype"))


def _correlated(m, c, seed=0, loc=0.0, condition=4.0):
    """(m, c) float32 rows with a dense covariance of eigenvalues spread ``condition``-fold."""
    r = np.random.default_rng(seed)
    q = np.linalg.qr(r.normal(size=(c, c)))[0]
    mix = q @ np.diag(np.sqrt(np.linspace(1.0, condition, c))) @ q.T
    return (r.normal(size=(m, c)) @ mix + loc + r.normal(size=c)).astype(np.float32)


def _flat(y):
    return np.asarray(y, np.float64).reshape(-1, y.shape[-1])


# ----------------------------------------------------------------------------- against NumPy


@pytest.mark.parametrize("group_size", some_slow([64, 3], fast={3}))
def test_t5_equals_the_papers_newton_schulz_in_float64(group_size):
    x = _correlated(128, 6, condition=8.0).reshape(8, 16, 6)  # statistics over (batch, positions)
    y, (mean, w) = _iter_norm(x, training=True, group_size=group_size, iterations=5)
    want, want_mean, want_w = ref.iter_norm(x.reshape(-1, 6), group_size, 5, 1e-5)
    np.testing.assert_allclose(_flat(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    assert w.shape == ((1, 6, 6) if group_size == 64 else (2, 3, 3))


def test_many_iterations_whiten_exactly_as_zca():
    x = _correlated(512, 5, condition=6.0)
    y, _ = _iter_norm(x, training=True, iterations=30)
    np.testing.assert_allclose(np.cov(_flat(y).T, bias=True), np.eye(5), atol=1e-4)
    np.testing.assert_allclose(_flat(y), ref.zca(x, 64, 1e-5), atol=1e-4)
    # T = 5 only half-whitens this covariance: the iteration count matters.
    y5, _ = _iter_norm(x, training=True, iterations=5)
    assert np.abs(np.cov(_flat(y5).T, bias=True) - np.eye(5)).max() > 1e-2


@pytest.mark.slow  # 60 steps on an ill-conditioned covariance (condition 100)
def test_the_iteration_stays_finite_and_converged_far_past_convergence():
    # The paper's uncoupled form overflows here in float32 after ~20 steps; the coupled one does not.
    x = _correlated(1024, 8, condition=100.0)
    y, (_, w) = _iter_norm(x, training=True, iterations=60)
    assert np.isfinite(np.asarray(w)).all()
    np.testing.assert_allclose(_flat(y), ref.zca(x, 64, 1e-5), atol=2e-3)


def test_groups_are_whitened_independently_block_diagonal():
    x = _correlated(256, 6, condition=5.0)
    y, _ = _iter_norm(x, training=True, group_size=2, iterations=30)
    cov = np.cov(_flat(y).T, bias=True)
    for g in range(3):  # each group white; across groups still correlated
        np.testing.assert_allclose(cov[2 * g:2 * g + 2, 2 * g:2 * g + 2], np.eye(2), atol=1e-4)
    assert np.abs(cov[:2, 2:]).max() > 0.05
    np.testing.assert_allclose(_flat(y), ref.zca(x, 2, 1e-5), atol=1e-4)
    # Each group is the layer on that group's channels alone.
    for g in range(3):
        alone, _ = _iter_norm(x[:, 2 * g:2 * g + 2], training=True, iterations=30)
        np.testing.assert_allclose(y[:, 2 * g:2 * g + 2], alone, atol=1e-6)


def test_channel_axis_other_than_last():
    x = _correlated(96, 4).reshape(8, 12, 4)
    y_last, (m_last, w_last) = _iter_norm(x, training=True)
    y_mid, (m_mid, w_mid) = _iter_norm(np.moveaxis(x, -1, 1), training=True, axis=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y_mid), 1, -1), y_last, atol=1e-6)
    np.testing.assert_allclose(w_mid, w_last, atol=1e-6)
    np.testing.assert_allclose(m_mid, m_last, atol=1e-6)


# ----------------------------------------------------------------------------- running statistics


def test_running_statistics_follow_the_momentum_formula_and_serve_inference():
    layer = normzoo.IterNorm(momentum=0.8, group_size=2)
    xs = [_correlated(64, 4, seed=s, loc=s) for s in range(3)]
    variables = layer.init(jax.random.key(0), xs[0], use_running_average=True)
    stats = variables["batch_stats"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(4))
    np.testing.assert_array_equal(stats["whitening"], np.broadcast_to(np.eye(2), (2, 2, 2)))
    mean, w = np.zeros(4), np.broadcast_to(np.eye(2), (2, 2, 2))
    for x in xs:
        _, upd = layer.apply({**variables, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"])
        _, batch_mean, batch_w = ref.iter_norm(x, 2, 5, 1e-5)
        mean, w = 0.8 * mean + 0.2 * batch_mean, 0.8 * w + 0.2 * batch_w
        stats = upd["batch_stats"]
        np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["whitening"], w, rtol=1e-5, atol=1e-6)
    # Inference: (x - running mean) W_running^T per group, scale and bias applied.
    params = {"scale": jnp.asarray([1.0, 2.0, 0.5, 1.5]), "bias": jnp.asarray([0.1, -0.2, 0.3, 0.0])}
    x = xs[0] + 3.0
    y = layer.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
    xc = x.astype(np.float64) - mean
    want = np.concatenate([xc[:, 2 * g:2 * g + 2] @ w[g].T for g in range(2)], 1) * np.asarray(params["scale"]) \
        + np.asarray(params["bias"])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- masks


def test_masked_positions_do_not_count_and_are_still_whitened():
    x = _correlated(48, 4).reshape(6, 8, 4)
    keep = np.zeros((6, 8, 1), bool)
    keep[:4] = True
    keep[4, :3] = True
    x_masked = x.copy()
    x_masked[~keep[..., 0]] = 1e3  # padding that must not reach the statistics
    y, (mean, w) = _iter_norm(x_masked, training=True, mask=jnp.asarray(keep))
    subset = x[keep[..., 0]]
    y_sub, (mean_sub, w_sub) = _iter_norm(subset, training=True)
    np.testing.assert_allclose(np.asarray(y)[keep[..., 0]], y_sub, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mean_sub, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, w_sub, rtol=1e-5, atol=1e-6)
    # The padded positions are whitened too, by the same statistics.
    pad = np.asarray(x_masked)[~keep[..., 0]]
    np.testing.assert_allclose(np.asarray(y)[~keep[..., 0]], (pad - np.asarray(mean)) @ np.asarray(w[0]).T, rtol=1e-5)
    # A fully masked batch: neutral statistics, running ones unchanged.
    y0, stats = _iter_norm(x, jnp.ones(4), jnp.eye(4)[None] * 2, training=True, mask=jnp.zeros((6, 1, 1), bool))
    np.testing.assert_array_equal(stats.mean, 1.0)
    np.testing.assert_array_equal(stats.whitening, np.eye(4)[None] * 2)
    np.testing.assert_allclose(y0, x / np.sqrt(1 + 1e-5), rtol=1e-4)


# ----------------------------------------------------------------------------- gradients, dtypes, numerics


def test_gradients_match_finite_differences_in_float64():
    x = _correlated(12, 3, condition=3.0).astype(np.float64)
    with jax.enable_x64(True):
        scale, bias = jnp.asarray([1.0, 0.5, 2.0]), jnp.asarray([0.1, 0.2, -0.1])

        @jax.jit
        def f(x, scale, bias):
            return _iter_norm(x, scale=scale, bias=bias, training=True, iterations=5, epsilon=1e-3)[0]

        assert f(jnp.asarray(x), scale, bias).dtype == jnp.float64
        jax.test_util.check_grads(f, (jnp.asarray(x), scale, bias), order=1, modes=("rev", "fwd"), atol=1e-6,
                                  rtol=1e-6)


@pytest.mark.slow  # the float64 check above covers the gradient's maths; this its float32 accuracy
def test_float32_gradient_equals_the_float64_one():
    x = _correlated(32, 4, condition=3.0)
    g = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)

    def loss(x):
        return jnp.sum(_iter_norm(x, training=True)[0] * g.astype(x.dtype))

    got = jax.grad(loss)(jnp.asarray(x))
    with jax.enable_x64(True):
        want = jax.grad(loss)(jnp.asarray(x, jnp.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_input_has_float32_statistics_and_bfloat16_output():
    x = _correlated(64, 4)
    layer = normzoo.IterNorm(use_running_average=False, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    y, upd = layer.apply(variables, jnp.asarray(x, jnp.bfloat16), mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd))
    _, mean, w = ref.iter_norm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), 64, 5, 1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.01 * mean, rtol=1e-5, atol=1e-7)  # momentum 0.99
    np.testing.assert_allclose(upd["batch_stats"]["whitening"], 0.99 * np.eye(4) + 0.01 * w, rtol=1e-5, atol=1e-7)
    y16, (_, w16) = _iter_norm(jnp.asarray(x, jnp.float16), training=True)
    assert y16.dtype == jnp.float16 and w16.dtype == jnp.float32


def test_a_large_mean_changes_nothing():
    x = _correlated(256, 4, condition=5.0).reshape(16, 16, 4)
    y, (mean, w) = _iter_norm(x, training=True)
    y_big, (mean_big, w_big) = _iter_norm(x + np.float32(1e4), training=True)
    np.testing.assert_allclose(y_big, y, atol=2e-3)  # float32 at 1e4: ulp 1e-3
    np.testing.assert_allclose(w_big, w, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(mean_big - 1e4, mean, atol=2e-3)


def test_a_constant_channel_gives_finite_outputs_and_gradients():
    x = _correlated(32, 4)
    x[:, 1] = 5.0
    y, (_, w) = _iter_norm(x, training=True)
    g = jax.grad(lambda x: jnp.sum(_iter_norm(x, training=True)[0] ** 3))(jnp.asarray(x))
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(w)).all() and np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(y)[:, 1], 0.0, atol=1e-6)  # centred to zero, nothing to whiten


# ----------------------------------------------------------------------------- errors


def test_every_error_names_the_argument_and_the_fix():
    x = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"iter_norm: group_size=4 does not divide the 6 channels of the input; choose "
                                         r"a divisor of 6 \(e\.g\. group_size=3\), or group_size >= 6"):
        _iter_norm(x, training=True, group_size=4)
    with pytest.raises(ValueError, match=r"iter_norm: group_size=0 must be a positive int: the number of channels "
                                         r"whitened together"):
        _iter_norm(x, training=True, group_size=0)
    with pytest.raises(ValueError, match=r"iter_norm: group_size=2\.0 must be a positive int"):
        _iter_norm(x, training=True, group_size=2.0)
    with pytest.raises(ValueError, match=r"iter_norm: iterations=-1 must be a non-negative int"):
        _iter_norm(x, training=True, iterations=-1)
    with pytest.raises(ValueError, match=r"iter_norm: axis=\(0, 1\) names 2 axes; IterNorm whitens the channels of one "
                                         r"feature axis"):
        _iter_norm(x, training=True, axis=(0, 1))
    with pytest.raises(ValueError, match=r"iter_norm: `axis`=\(2,\) is out of range for an input of rank 2"):
        _iter_norm(x, training=True, axis=2)
    with pytest.raises(TypeError, match=r"iter_norm: complex input \(dtype complex64\) is not supported"):
        _iter_norm(x.astype(jnp.complex64), training=True)
    with pytest.raises(ValueError, match=r"iter_norm: `mask` of shape \(4, 6\) varies along the channel axis 1 .* "
                                         r"give the mask size 1 along that axis"):
        _iter_norm(x, training=True, mask=jnp.ones((4, 6), bool))
    with pytest.raises(ValueError, match=r"iter_norm: `whitening` has shape \(1, 6, 6\), but 6 channels in groups of 3 "
                                         r"\(group_size=3\) need \(2, 3, 3\)"):
        _iter_norm(x, jnp.zeros(6), jnp.ones((1, 6, 6)), training=False, group_size=3)
    with pytest.raises(ValueError, match=r"iter_norm: training=False whitens with the running statistics, but "
                                         r"`whitening` is None"):
        _iter_norm(x, jnp.zeros(6), training=False)
    with pytest.raises(ValueError, match=r"iter_norm: `scale` has shape \(5,\)"):
        _iter_norm(x, scale=jnp.ones(5), training=True)
    with pytest.raises(ValueError, match=r"IterNorm: group_size=4 does not divide the 6 channels"):
        normzoo.IterNorm(use_running_average=False, group_size=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"IterNorm: group_size=4 does not divide the 6 channels"):
        nznnx.IterNorm(6, group_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"IterNorm: num_features=\(2, 3\) must give one size per feature axis"):
        nznnx.IterNorm((2, 3), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- layers, registry, fold


def test_linen_fields_follow_batch_norm_and_the_nnx_twin_equals_linen():
    fields = [f.name for f in normzoo.IterNorm.__dataclass_fields__.values() if f.init and f.name not in ("parent", "name")]
    bn = [f.name for f in normzoo.BatchNorm.__dataclass_fields__.values() if f.init and f.name not in ("parent", "name")]
    # BatchNorm's fields in its order (no use_fast_variance / force_float32_reductions), the paper's
    # group_size and T, then BatchNorm's keyword-only ones.
    flax_part = [f for f in bn if f in fields and f not in ("virtual_batch_size", "scale_plus_one")]
    assert fields == flax_part + ["group_size", "iterations", "virtual_batch_size", "scale_plus_one"]
    assert flax_part == bn[:12] and "use_fast_variance" not in fields
    kw_only = {f.name for f in normzoo.IterNorm.__dataclass_fields__.values() if f.kw_only}
    assert {"virtual_batch_size", "scale_plus_one"} <= kw_only and "group_size" not in kw_only
    x = jnp.asarray(_correlated(64, 6).reshape(4, 16, 6))
    linen = normzoo.IterNorm(group_size=3, momentum=0.9, scale_plus_one=True)
    variables = linen.init(jax.random.key(0), x, use_running_average=True)
    variables = {"params": {"scale": jnp.linspace(-0.5, 0.5, 6), "bias": jnp.linspace(0, 1, 6)},
                 "batch_stats": variables["batch_stats"]}
    y, upd = linen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    twin = nznnx.IterNorm(6, group_size=3, momentum=0.9, scale_plus_one=True, rngs=nnx.Rngs(0))
    nznnx.from_linen(twin, variables)
    np.testing.assert_allclose(twin(x), y, rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, nznnx.to_linen(twin)["batch_stats"], upd["batch_stats"])
    twin.eval()
    want = linen.apply({**variables, **upd}, x, use_running_average=True)
    np.testing.assert_allclose(twin(x), want, rtol=1e-6, atol=1e-6)


def test_registry_name_builds_both_apis_and_fold_keeps_the_layer():
    spec = normzoo.make("iter", group_size=4)
    assert "iter" in normzoo.available() and spec.batch_statistics and not spec.is_identity
    layer = spec.norm(train=True)
    assert type(layer) is normzoo.IterNorm and layer.group_size == 4 and layer.use_running_average is False
    assert nznnx.make("iter").norm(8, train=False, rngs=nnx.Rngs(0)).use_running_average is True

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return normzoo.make("iter").norm(train=train)(nn.Dense(8)(x))

    x = jnp.asarray(_correlated(16, 5))
    variables = Net().init(jax.random.key(0), x, train=True)
    _, upd = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **upd}
    folded = deploy.fold(Net(), variables, x, train=False)
    reason = ("whitening: its inference map multiplies by a matrix across the channels of each group, not a "
              "per-channel scale and shift")
    assert folded.report == (("IterNorm_0", "IterNorm", "kept", reason),)
    np.testing.assert_allclose(folded(x, train=False), Net().apply(variables, x, train=False), rtol=1e-6)
    with pytest.raises(ValueError, match=r"fold: the IterNorm at 'IterNorm_0' ran in training mode"):
        deploy.fold(Net(), variables, x, train=True)


# ----------------------------------------------------------------------------- 8 devices

D, AXIS = 8, "batch"


def _sync_step(layer, variables, x, w):
    def loss(params, x):
        y, upd = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * w), (y, upd)

    (_, (y, upd)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    return y, upd, gp, gx


@pytest.mark.skipif(jax.device_count() < D, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("mapper", some_slow(["shard_map", "pmap"], fast={"shard_map"}))
def test_synced_on_8_devices_equals_the_global_batch(mapper):
    x = _correlated(8 * 4 * 6, 6, loc=1.0).reshape(8 * 4, 6, 6)
    w = RNG.normal(size=x.shape).astype(np.float32)
    make = functools.partial(normzoo.IterNorm, use_running_average=False, momentum=0.7, group_size=3)
    variables = make().init(jax.random.key(0), x)
    variables["params"] = {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1, 1, 6)}
    y0, u0, gp0, gx0 = jax.jit(functools.partial(_sync_step, make()))(variables, x, w)
    layer = make(axis_name=AXIS)
    if mapper == "shard_map":
        mesh = jax.make_mesh((D,), (AXIS,))
        f = jax.jit(jax.shard_map(lambda v, x, w: _sync_step(layer, v, x, w), mesh=mesh,
                                  in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(), P(), P(AXIS))))
        def put(a):
            return jax.device_put(a, NamedSharding(mesh, P(AXIS)))

        y, upd, gp, gx = f(variables, put(x), put(w))
    else:
        def step(v, x, w):
            y, upd, gp, gx = _sync_step(layer, v, x, w)
            return y, upd, jax.lax.psum(gp, AXIS), gx

        def shard(a):
            return a.reshape((D, -1) + a.shape[1:])

        rep = jax.tree.map(lambda a: jnp.stack([a] * D), variables)
        y, upd, gp, gx = jax.pmap(step, axis_name=AXIS)(rep, shard(x), shard(w))
        y, gx = y.reshape(x.shape), gx.reshape(x.shape)
        jax.tree.map(lambda a: np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape)), upd)
        upd, gp = jax.tree.map(lambda a: a[0], (upd, gp))
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, gx0, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), gp, gp0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), upd, u0)
    # One collective in the forward pass (the stacked count, mean and centred sum of outer products),
    # and a large mean combined across devices as accurately as float64 on the global batch allows.
    mesh = jax.make_mesh((D,), (AXIS,))
    forward = jax.jit(jax.shard_map(lambda x: _iter_norm(x, training=True, axis_name=AXIS, group_size=3),
                                    mesh=mesh, in_specs=P(AXIS), out_specs=(P(AXIS), P())))
    big = x + np.float32(1e4)
    sharded = jax.device_put(big, NamedSharding(mesh, P(AXIS)))
    text = forward.lower(sharded).as_text()
    assert text.count("all_reduce") + text.count("all-reduce") == 1
    _, (mean, w) = forward(sharded)
    _, want_mean, want_w = ref.iter_norm(big.reshape(-1, 6), 3, 5, 1e-5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(w, want_w, rtol=2e-3, atol=2e-4)


@pytest.mark.slow  # ghost batches, with and without devices
def test_ghost_batches_whiten_each_sub_batch_and_average_the_running_statistics():
    x = _correlated(64, 4).reshape(16, 4, 4)
    y, (mean, w) = _iter_norm(x, training=True, virtual_batch_size=4)
    parts = [_iter_norm(x[4 * i:4 * i + 4], training=True) for i in range(4)]
    np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, np.mean([p[1].mean for p in parts], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, np.mean([p[1].whitening for p in parts], 0), rtol=1e-5, atol=1e-6)
    mesh = jax.make_mesh((D,), (AXIS,))
    synced = jax.jit(jax.shard_map(
        lambda x: _iter_norm(x, training=True, virtual_batch_size=2, axis_name=AXIS),
        mesh=mesh, in_specs=P(AXIS), out_specs=(P(AXIS), P())))
    y8, (mean8, w8) = synced(jax.device_put(x, NamedSharding(mesh, P(AXIS))))
    local = [_iter_norm(x[2 * i:2 * i + 2], training=True) for i in range(8)]
    np.testing.assert_allclose(y8, np.concatenate([p[0] for p in local]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean8, np.mean([p[1].mean for p in local], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w8, np.mean([p[1].whitening for p in local], 0), rtol=1e-5, atol=1e-6)
