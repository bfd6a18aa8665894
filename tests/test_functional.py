"""normzoo.functional: every function against an independent NumPy reference (float64), on plain
arrays, under jit; running statistics exactly; masks, large means, complex inputs, empty channels;
sync on 8 devices; errors. No module anywhere in this file."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from normzoo import functional as F
from tests import reference as ref
from tests.conftest import forced_path, some_slow
from tests.test_santurkar_layers import lp_reference

CASES = {
    "normal": lambda r, s: r.normal(size=s) * 2.0 + 0.5,
    "large_mean": lambda r, s: r.normal(size=s) + 1e4,
    "constant_channel": lambda r, s: np.concatenate(
        [np.full(s[:-1] + (1,), 3.25), r.normal(size=s[:-1] + (s[-1] - 1,))], -1),
}
TOL = {"normal": 2e-5, "large_mean": 2e-3, "constant_channel": 2e-5}


def data(case, shape, seed=0):
    return np.asarray(CASES[case](np.random.default_rng(seed), shape), np.float32)


def vec(c, seed, lo=0.5, hi=1.5):
    return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, c), jnp.float32)


def ibn_reference(x, k, eps, in_scale, in_bias, scale, bias):
    a = ref.instance_norm(x[..., :k], eps) * ref.f64(in_scale) + ref.f64(in_bias)
    b = ref.batch_norm(x[..., k:], (0, 1, 2), eps, ref.f64(scale), ref.f64(bias))
    return np.concatenate([a, b], -1)


# (function call on x and the per-channel vectors, NumPy reference, input shape); every function
# with statistics is checked on every case, on both statistics paths.
def _functions():
    c = 6
    s, b = vec(c, 1), vec(c, 2, -1, 1)
    mean, var = vec(c, 3, -1, 1), vec(c, 4, 0.5, 2)
    return {
        "batch_norm": (lambda x: F.batch_norm(x, mean, var, s, b, training=True)[0],
                       lambda x: ref.batch_norm(x, (0, 1, 2), 1e-5, ref.f64(s), ref.f64(b)), (8, 3, 3, c)),
        "batch_norm inference": (
            lambda x: F.batch_norm(x, mean, var, s, b, training=False)[0],
            lambda x: (ref.f64(x) - ref.f64(mean)) / np.sqrt(ref.f64(var) + 1e-5) * ref.f64(s) + ref.f64(b),
            (8, 3, 3, c)),
        "mean_only_batch_norm": (lambda x: F.mean_only_batch_norm(x, mean, s, b, training=True)[0],
                                 lambda x: (ref.f64(x) - ref.f64(x).mean((0, 1))) * ref.f64(s) + ref.f64(b), (16, 4, c)),
        "batch_renorm": (
            lambda x: F.batch_renorm(x, mean, var, jnp.int32(0), training=True, r_max=1.5, d_max=0.5, warmup_steps=0)[0],
            lambda x: ref.batch_renorm(x, (0,), 1e-5, mean, var, 1.5, 0.5), (32, c)),
        "lp_batch_norm p=1": (lambda x: F.lp_batch_norm(x, p=1, training=True)[0],
                              lambda x: lp_reference(x, 1)[0], (64, c)),
        "lp_batch_norm p=inf": (lambda x: F.lp_batch_norm(x, p="inf", training=True)[0],
                                lambda x: lp_reference(x, math.inf)[0], (64, c)),
        "layer_norm": (lambda x: F.layer_norm(x, s, b),
                       lambda x: ref.layer_norm(x, (2,), 1e-6) * ref.f64(s) + ref.f64(b), (4, 5, c)),
        "rms_norm": (lambda x: F.rms_norm(x, s), lambda x: ref.rms_norm(x, (2,), 1e-6) * ref.f64(s), (4, 5, c)),
        "group_norm": (lambda x: F.group_norm(x, s, b, num_groups=3),
                       lambda x: ref.group_norm(x, 3, 1e-6) * ref.f64(s) + ref.f64(b), (3, 4, 4, c)),
        "instance_norm": (lambda x: F.instance_norm(x, s, b),
                          lambda x: ref.instance_norm(x, 1e-6) * ref.f64(s) + ref.f64(b), (3, 4, 4, c)),
        "tracked_instance_norm": (lambda x: F.tracked_instance_norm(x, mean, var, s, b, training=True)[0],
                                  lambda x: ref.instance_norm(x, 1e-6) * ref.f64(s) + ref.f64(b), (3, 4, 4, c)),
        "ibn": (lambda x: F.ibn(x, mean[:4], var[:4], s[:4], b[:4], s[4:], b[4:], ratio=1 / 3, training=True)[0],
                lambda x: ibn_reference(x, 2, 1e-5, s[4:], b[4:], s[:4], b[:4]), (8, 3, 3, c)),
    }


FUNCTIONS = _functions()


# Every function on every case; the constant channel (covered for each family by the layers'
# tests) for two functions in the default run, all in the slow one.
@pytest.mark.parametrize("name,case", some_slow(
    [(n, c) for n in FUNCTIONS for c in sorted(CASES)],
    fast={(n, c) for n in FUNCTIONS for c in ("normal", "large_mean")} | {("batch_norm", "constant_channel"),
                                                                        ("group_norm", "constant_channel")},
    ids=lambda v: f"{v[0]}-{v[1]}"))
def test_every_function_matches_its_numpy_reference(name, case):
    fn, reference, shape = FUNCTIONS[name]
    x = data(case, shape)
    y = jax.jit(fn)(x)
    tol = TOL[case] * (5 if "lp" in name and case == "large_mean" else 1)
    np.testing.assert_allclose(y, reference(x), atol=tol, rtol=0)
    assert np.isfinite(y).all()


# The second statistics path (every platform but XLA:CPU) for the same functions: the slow run.
@pytest.mark.parametrize("name", some_slow([n for n in FUNCTIONS if "inference" not in n],  # no statistics taken
                                           fast={"batch_norm", "group_norm"}))
def test_every_function_on_the_shifted_path(name):
    fn, reference, shape = FUNCTIONS[name]
    x = data("large_mean", shape)
    with forced_path("shifted"):
        y = jax.jit(lambda x: fn(x))(x)  # a new function: traced on this path, not taken from the cache
    tol = TOL["large_mean"] * (5 if "lp" in name else 1)
    np.testing.assert_allclose(y, reference(x), atol=tol, rtol=0)


def test_running_statistics_are_updated_exactly():
    x = data("normal", (16, 2, 5))
    mean, var = vec(5, 3), vec(5, 4)
    _, stats = jax.jit(lambda x, m, v: F.batch_norm(x, m, v, training=True, momentum=0.8))(x, mean, var)
    x64 = ref.f64(x)
    np.testing.assert_allclose(stats.mean, 0.8 * ref.f64(mean) + 0.2 * x64.mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(stats.var, 0.8 * ref.f64(var) + 0.2 * x64.var((0, 1)), rtol=1e-6)
    _, same = F.batch_norm(x, mean, var, training=False)
    assert same.mean is mean and same.var is var  # inference returns them as they were
    steps = F.batch_renorm(x, mean, var, jnp.int32(7), training=True)[1].steps
    assert int(steps) == 8 and steps.dtype == jnp.int32
    _, tracked = F.tracked_instance_norm(x, mean, var, training=True, momentum=0.5)
    np.testing.assert_allclose(tracked.var, 0.5 * ref.f64(var) + 0.5 * x64.var(1).mean(0), rtol=1e-6)
    # Lp: var holds s_p^2 (the L1 deviation scaled to the standard deviation of Gaussian data).
    _, lp = F.lp_batch_norm(x.reshape(32, 5), mean, var, p=1, training=True, momentum=0.0)
    np.testing.assert_allclose(lp.var, lp_reference(x.reshape(32, 5), 1)[2], rtol=1e-5)
    # Without running statistics there is nothing to update.
    assert F.batch_norm(x, training=True)[1] == (None, None)


def test_masks_ghost_batches_and_axes():
    r = np.random.default_rng(0)
    x = data("large_mean", (12, 4))
    keep = r.random(12) < 0.6
    y, stats = F.batch_norm(x, jnp.zeros(4), jnp.ones(4), training=True, momentum=0.0, mask=jnp.asarray(keep)[:, None])
    np.testing.assert_allclose(y[keep], ref.batch_norm(x[keep], (0,), 1e-5), atol=2e-3)
    np.testing.assert_allclose(stats.mean, ref.f64(x[keep]).mean(0), rtol=1e-7)
    # Ghost batches: each sub-batch its own statistics; the running ones their average.
    g, gs = F.batch_norm(x, jnp.zeros(4), jnp.ones(4), training=True, momentum=0.0, virtual_batch_size=4)
    for i in range(3):
        np.testing.assert_allclose(g[4 * i:4 * i + 4], ref.batch_norm(x[4 * i:4 * i + 4], (0,), 1e-5), atol=2e-3)
    np.testing.assert_allclose(gs.var, ref.f64(x).reshape(3, 4, 4).var(1).mean(0), rtol=1e-4)
    # Channels first; several feature axes.
    xc = data("normal", (4, 3, 5, 6))
    np.testing.assert_allclose(F.batch_norm(xc, training=True, axis=1)[0], ref.batch_norm(xc, (0, 2, 3), 1e-5), atol=2e-5)
    np.testing.assert_allclose(F.layer_norm(xc, reduction_axes=(2, 3), feature_axes=(2, 3)),
                               ref.layer_norm(xc, (2, 3), 1e-6), atol=2e-5)


def test_complex_inputs_have_a_complex_mean_and_a_real_variance():
    r = np.random.default_rng(1)
    x = (r.normal(size=(32, 3)) + 1j * r.normal(size=(32, 3)) + (3 - 2j)).astype(np.complex64)
    y, stats = F.batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True, momentum=0.0)
    mu = x.astype(np.complex128).mean(0)
    var = (np.abs(x - mu) ** 2).mean(0)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5), atol=1e-5)
    assert jnp.iscomplexobj(stats.mean) and not jnp.iscomplexobj(stats.var)
    np.testing.assert_allclose(stats.var, var, rtol=1e-5)
    np.testing.assert_allclose(F.layer_norm(x), (x - x.mean(-1, keepdims=True)) / np.sqrt(
        (np.abs(x - x.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + 1e-6), atol=1e-5)


def test_a_channel_no_element_reaches_gets_the_neutral_statistics():
    """mean 0, variance 1: the affine part alone, in every function (not x / sqrt(eps))."""
    x = data("normal", (4, 3, 3, 4)) * 10
    s, b = vec(4, 1), vec(4, 2)
    mask = np.ones(x.shape, bool)
    mask[..., 1] = False  # channel 1 never counted
    neutral = ref.f64(x[..., 1]) / np.sqrt(1 + 1e-5) * ref.f64(s[1]) + ref.f64(b[1])
    y, stats = F.batch_norm(x, jnp.full(4, 7.0), jnp.full(4, 9.0), s, b, training=True, mask=jnp.asarray(mask))
    np.testing.assert_allclose(y[..., 1], neutral, rtol=1e-5)
    assert float(stats.mean[1]) == 7.0 and float(stats.var[1]) == 9.0  # no data arrived: unchanged
    # The other channels are normalized over their own elements as usual.
    np.testing.assert_allclose(y[..., 0], ref.batch_norm(x[..., :1], (0, 1, 2), 1e-5)[..., 0] * ref.f64(s[0]) + ref.f64(b[0]),
                               atol=1e-4)
    eps6 = np.sqrt(1 + 1e-6)
    yi = F.instance_norm(x, s, b, mask=jnp.asarray(mask))
    np.testing.assert_allclose(yi[..., 1], ref.f64(x[..., 1]) / eps6 * ref.f64(s[1]) + ref.f64(b[1]), rtol=1e-5)
    yg = F.group_norm(x, s, b, num_groups=4, mask=jnp.asarray(mask))
    np.testing.assert_allclose(yg[..., 1], ref.f64(x[..., 1]) / eps6 * ref.f64(s[1]) + ref.f64(b[1]), rtol=1e-5)
    # A LayerNorm row that the mask empties: the whole row is the affine part.
    row = np.ones((2, 4), bool)
    row[1] = False
    yl = F.layer_norm(x[0, 0, :2], s, b, mask=jnp.asarray(row))
    np.testing.assert_allclose(yl[1], ref.f64(x[0, 0, 1]) / eps6 * ref.f64(s) + ref.f64(b), rtol=1e-5)
    for p in (1, "inf"):
        yp, _ = F.lp_batch_norm(x, p=p, training=True, mask=jnp.asarray(mask))
        np.testing.assert_allclose(yp[..., 1], ref.f64(x[..., 1]) / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_batch_renorm_keeps_empty_channels_neutral_and_counts_python_ints():
    x = data("normal", (16, 4)) * 3
    mask = np.ones(x.shape, bool)
    mask[:, 2] = False
    for schedule in ("linear", "step"):
        y, stats = F.batch_renorm(x, jnp.full(4, 5.0), jnp.full(4, 4.0), 0, training=True, warmup_steps=0,
                                  warmup_schedule=schedule, mask=jnp.asarray(mask))
        np.testing.assert_allclose(y[:, 2], x[:, 2] / np.sqrt(1 + 1e-5), rtol=1e-5)  # r = 1, d = 0 there
        assert int(stats.steps) == 1
    # Ghost batches shape the batch statistics only: inference takes any batch size.
    y, _ = F.batch_norm(x[:5], jnp.zeros(4), jnp.ones(4), training=False, virtual_batch_size=4)
    np.testing.assert_allclose(y, x[:5] / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_gradients_match_flax_on_the_same_arrays():
    """batch_norm's gradients (input, scale, bias) against flax.linen.BatchNorm's own."""
    import flax.linen as nn

    x, w = data("normal", (16, 5)), data("normal", (16, 5), seed=1)
    s, b = vec(5, 1), vec(5, 2)

    def ours(x, s, b):
        return jnp.sum(jnp.tanh(F.batch_norm(x, training=True, scale=s, bias=b)[0]) * w)

    layer = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    v = layer.init(jax.random.key(0), x)

    def theirs(x, s, b):
        y, _ = layer.apply({"params": {"scale": s, "bias": b}, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.tanh(y) * w)

    chex.assert_trees_all_close(jax.grad(ours, (0, 1, 2))(x, s, b), jax.grad(theirs, (0, 1, 2))(x, s, b),
                                rtol=1e-4, atol=1e-5)


def test_vmap_with_axis_name_is_the_batched_function():
    x = data("large_mean", (16, 5))
    mean, var = vec(5, 3), vec(5, 4)
    per_example = jax.vmap(lambda r: F.batch_norm(r, mean, var, training=True, axis_name="i"),
                           axis_name="i", out_axes=(0, None))
    y, stats = per_example(x)
    y_ref, stats_ref = F.batch_norm(x, mean, var, training=True)
    np.testing.assert_allclose(y, y_ref, atol=2e-3)
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("with_ibn", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_shard_map_on_8_devices_equals_the_global_batch(with_ibn):
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, w = data("normal", (32, 3, 6)), data("normal", (32, 3, 6), seed=1)
    mask = np.random.default_rng(2).random((32, 1, 1)) < 0.7
    mean, var, s, b = vec(6, 3), vec(6, 4), vec(6, 1), vec(6, 2)

    def step(x, w, mask, axis_name):
        def loss(x, s, b):
            y, stats = F.batch_norm(x, mean, var, s, b, training=True, mask=mask, axis_name=axis_name)
            if not with_ibn:
                return jnp.sum(y * w), stats
            z, _ = F.ibn(x, mean[:3], var[:3], s[:3], b[:3], s[3:], b[3:], training=True, axis_name=axis_name)
            return jnp.sum(y * w) + jnp.sum(z * w), stats
        (_, stats), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, s, b)
        return stats, grads

    want = step(x, w, mask, None)
    sharded = jax.jit(jax.shard_map(lambda x, w, m: step(x, w, m, "batch"), mesh=mesh,
                                    in_specs=(P("batch"),) * 3, out_specs=(P(), (P("batch"), P(), P()))))
    got = sharded(*(jax.device_put(a, jax.NamedSharding(mesh, P("batch"))) for a in (x, w, mask)))
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_weight_side_functions_match_their_references():
    r = np.random.default_rng(0)
    x, v, g, bias = (r.normal(size=s).astype(np.float32) for s in ((3, 5), (5, 4), (4,), (4,)))
    np.testing.assert_allclose(x @ F.weight_norm(v, g) + bias, ref.weight_norm_dense(x, v, g, bias), rtol=1e-5)
    np.testing.assert_allclose(F.cosine_dense(x, v), ref.cosine_dense(x, v), rtol=1e-5, atol=1e-6)
    xc, k = r.normal(size=(2, 6, 6, 3)).astype(np.float32), r.normal(size=(3, 3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(F.conv(xc, k), ref.conv_same(xc, k), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(F.conv(xc, F.weight_norm(k, g)), ref.conv_same(xc, F.weight_norm(k, g)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(F.cosine_conv(xc, k), ref.cosine_conv_same(xc, k), rtol=1e-4, atol=1e-5)
    # mask: the norm of the masked weights
    mask = (r.random((5, 4)) < 0.6).astype(np.float32)
    np.testing.assert_allclose(F.weight_norm(v, g, mask=mask), g * v * mask / np.linalg.norm(v * mask, axis=0), rtol=1e-5)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: F.batch_norm(jnp.ones((4, 3)), jnp.zeros(4), jnp.ones(3), training=True), ValueError,
     r"batch_norm: `mean` has shape \(4,\), but the input of shape \(4, 3\) has \(3,\) features along `axis`=\(1,\); "
     r"give it shape \(3,\)"),
    (lambda: F.batch_norm(jnp.ones((4, 3)), training=False), ValueError,
     r"batch_norm: training=False normalizes by the running statistics, but `mean` is None; pass the running statistics"),
    (lambda: F.batch_norm(jnp.ones((4, 3)), scale=jnp.ones(2), training=True), ValueError,
     r"batch_norm: `scale` has shape \(2,\)"),
    (lambda: F.batch_norm(jnp.ones((4, 3)), training=True, momentum=1.5), ValueError,
     r"batch_norm: momentum=1.5 must lie in \[0, 1\]"),
    (lambda: F.batch_renorm(jnp.ones((4, 3)), None, None, None, training=True), ValueError,
     r"batch_renorm: BatchRenorm corrects by its running statistics: pass `mean`, `var` and `steps`"),
    (lambda: F.noisy_batch_norm(jnp.ones((4, 3)), key=None, training=True), ValueError,
     r"noisy_batch_norm: training draws noise: pass `key`"),
    (lambda: F.layer_norm(jnp.ones((4, 3)), jnp.ones(4)), ValueError,
     r"layer_norm: `scale` has shape \(4,\), but the input of shape \(4, 3\) has \(3,\) features along `feature_axes`"),
    (lambda: F.group_norm(jnp.ones((2, 4, 6)), num_groups=4), ValueError,
     r"group_norm: num_groups=4 must be positive and divide the 6 channels of the input \(shape \(2, 4, 6\)\)"),
    (lambda: F.weight_norm(jnp.ones((5, 4)), jnp.ones(5)), ValueError,
     r"weight_norm: `g` has shape \(5,\), but `v` of shape \(5, 4\) has \(4,\) along feature_axes=-1; give g "
     r"the shape \(4,\)"),
    (lambda: F.conv(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 2, 4))), ValueError,
     r"conv: `kernel` has shape \(3, 3, 2, 4\), but the input of shape \(1, 6, 6, 3\) needs \(3, 3, 3, 4\)"),
    (lambda: F.cosine_dense(jnp.ones((2, 3)), jnp.ones((3, 4)), bias=jnp.ones(3)), ValueError,
     r"cosine_dense: `bias` has shape \(3,\), but the kernel has 4 output features"),
    (lambda: F.cosine_dense(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones(4)), ValueError,
     r"cosine_dense: `scale` must be a scalar \(one temperature for every output\), got shape \(4,\)"),
    (lambda: F.weight_norm(jnp.ones((5, 4)), jnp.ones(4), mask=jnp.ones(4)), ValueError,
     r"weight_norm: `mask` has shape \(4,\), but `v` has shape \(5, 4\)"),
])
def test_errors_name_the_argument_the_value_and_the_fix(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
