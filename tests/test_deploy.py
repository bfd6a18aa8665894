"""normzoo.deploy: folding, precise BN / AdaBN, checkpoint conversion, serialization."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normzoo
from normzoo import deploy
from tests import reference as ref
from tests.conftest import some_slow

RNG = np.random.default_rng(0)


def _randomize(variables, seed=0):
    """Trained-looking variables: random scales, shifts and running statistics (var > 0)."""
    r = np.random.default_rng(seed)

    def new(path, a):
        name = str(path[-1].key)
        if jnp.result_type(a) != jnp.float32 or name in ("steps", "r_max", "d_max"):
            return a
        if name == "var":
            return jnp.asarray(r.uniform(0.5, 2.0, a.shape), a.dtype)
        if name in ("scale", "g"):
            return jnp.asarray(r.uniform(0.5, 1.5, a.shape), a.dtype)
        if name in ("mean", "bias"):
            return jnp.asarray(r.normal(0, 0.5, a.shape), a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(new, variables)


# ----------------------------------------------------------------------------- folding


def _assert_folded_equal(got, want):
    """Within 1e-5 relative, the absolute part scaled by the largest output."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))

PRODUCERS = {
    "Dense": lambda bias: nn.Dense(6, use_bias=bias),
    "Conv": lambda bias: nn.Conv(6, (3, 3), use_bias=bias),
    "ConvTranspose": lambda bias: nn.ConvTranspose(6, (3, 3), strides=(2, 2), use_bias=bias),
    "ConvTranspose_transposed": lambda bias: nn.ConvTranspose(6, (3, 3), use_bias=bias, transpose_kernel=True),
    "WeightNormDense": lambda bias: normzoo.WeightNormDense(6, use_bias=bias),
    "WeightNormConv": lambda bias: normzoo.WeightNormConv(6, (3, 3), use_bias=bias),
}
NORMALIZERS = {
    "flax_BatchNorm": lambda: nn.BatchNorm(use_running_average=True),
    "BatchNorm": lambda: normzoo.BatchNorm(use_running_average=True),
    "BatchRenorm": lambda: normzoo.BatchRenorm(use_running_average=True),
    "MeanOnlyBatchNorm": lambda: normzoo.MeanOnlyBatchNorm(use_running_average=True),
    "sbx_BatchRenorm": lambda: normzoo.sbx.BatchRenorm(use_running_average=True),
    "IBN": lambda: normzoo.IBN(use_running_average=True, ratio=0.5),
}


class Pair(nn.Module):
    producer: str
    normalizer: str
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        return NORMALIZERS[self.normalizer]()(PRODUCERS[self.producer](self.bias)(x))


PAIRS = [(p, n, b) for p in PRODUCERS for n in NORMALIZERS for b in (True, False)]
# Every producer kind and every normalizer once by default; every pair, with and without bias, slow.
FAST_PAIRS = {("Conv", "BatchNorm", False), ("Dense", "flax_BatchNorm", True), ("ConvTranspose", "MeanOnlyBatchNorm", True),
              ("ConvTranspose_transposed", "BatchRenorm", False), ("WeightNormConv", "IBN", True),
              ("WeightNormDense", "sbx_BatchRenorm", False)}


@pytest.mark.parametrize("producer,normalizer,bias", some_slow(PAIRS, fast=FAST_PAIRS, ids=lambda v: "-".join(map(str, v))))
def test_fold_each_producer_and_normalizer(producer, normalizer, bias):
    x = jnp.asarray(RNG.normal(size=(4, 5, 5, 3)) * 2 + 1, jnp.float32)
    model = Pair(producer, normalizer, bias)
    variables = _randomize(model.init(jax.random.key(0), x), seed=1)
    folded = deploy.fold(model, variables, x)
    producer_name = type(PRODUCERS[producer](bias)).__name__ + "_0"
    normalizer_name = type(NORMALIZERS[normalizer]()).__name__ + "_0"
    assert folded.folded == {normalizer_name: producer_name}
    assert sorted(folded.variables["params"][producer_name]) == ["bias", "kernel"]
    assert sorted(folded.variables["params"]) == sorted({producer_name} | ({normalizer_name} if normalizer == "IBN" else set()))
    assert "batch_stats" not in folded.variables
    x2 = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)  # not the input fold() saw
    want, got = model.apply(variables, x2), folded(x2)
    _assert_folded_equal(got, want)
    assert folded.max_error < 1e-5


def test_folded_conv_kernel_and_bias_follow_the_formula():
    """W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta (NumPy)."""
    x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3)), jnp.float32)
    model = Pair("Conv", "flax_BatchNorm", True)
    v = _randomize(model.init(jax.random.key(0), x), seed=2)
    conv, bn, stats = (jax.tree.map(np.asarray, t) for t in (v["params"]["Conv_0"], v["params"]["BatchNorm_0"],
                                                              v["batch_stats"]["BatchNorm_0"]))
    m = bn["scale"] / np.sqrt(stats["var"] + 1e-5)
    got = deploy.fold(model, v, x).variables["params"]["Conv_0"]
    np.testing.assert_allclose(got["kernel"], conv["kernel"] * m, rtol=1e-6)
    np.testing.assert_allclose(got["bias"], (conv["bias"] - stats["mean"]) * m + bn["bias"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel_shape,axis,bias", [((5, 4), -1, True), ((3, 3, 2, 4), -1, False),
                                                    ((3, 3, 4, 2), -2, True)], ids=["dense", "conv_no_bias", "transposed"])
def test_fold_pair_is_the_formula(kernel_shape, axis, bias):
    """W' = W * m along the output channels, b' = (b - mean) * m + a, in the inputs' dtypes (NumPy)."""
    r = np.random.default_rng(3)
    kernel = r.normal(size=kernel_shape).astype(np.float32)
    c = kernel_shape[axis]
    b = r.normal(size=c).astype(np.float32) if bias else None
    mean, mul, add = (r.normal(size=c).astype(np.float32) for _ in range(3))
    k2, b2 = deploy.fold_pair(kernel, b, mean, mul, add, axis=axis)
    view = [1] * kernel.ndim
    view[axis] = c
    np.testing.assert_allclose(k2, ref.f64(kernel) * ref.f64(mul).reshape(view), rtol=1e-6)
    np.testing.assert_allclose(b2, ((0 if b is None else ref.f64(b)) - ref.f64(mean)) * ref.f64(mul) + ref.f64(add),
                               rtol=1e-6, atol=1e-7)
    assert k2.dtype == b2.dtype == np.float32
    half = deploy.fold_pair(kernel.astype(jnp.bfloat16), None, mean, mul, add, axis=axis)
    assert half[0].dtype == half[1].dtype == jnp.bfloat16


class Mixed(nn.Module):
    """Foldable and unfoldable placements in one model."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(normzoo.BatchNorm, use_running_average=not train)
        a = bn(name="after_conv")(nn.Conv(8, (3, 3), name="conv_a")(x))  # folded
        b = bn(name="after_relu")(nn.relu(nn.Conv(8, (3, 3), name="conv_b")(a)))  # after an activation
        c_out = nn.Conv(8, (3, 3), name="conv_c")(b)
        c = bn(name="twice_used")(c_out) + c_out  # the conv output also feeds the add
        d = nn.BatchNorm(use_running_average=not train, name="flax_after_add")(c + a)  # after an add
        e = normzoo.IBN(use_running_average=not train, name="ibn")(nn.Conv(8, (1, 1), name="conv_e")(d))
        f = normzoo.LayerNorm(name="layer")(e)  # per-example: kept
        g = normzoo.BatchNorm(use_running_average=not train, axis=1, name="other_axis")(
            nn.Conv(8, (3, 3), name="conv_g")(f))  # statistics over rows, not the conv's channels
        h = normzoo.WeightNormDense(10, name="head")(jnp.mean(g, axis=(1, 2)))  # materialized
        return normzoo.MeanOnlyBatchNorm(use_running_average=not train, name="mean_only")(
            nn.Dense(10, name="dense")(h))  # folded


def test_fold_reports_what_it_folded_and_why_not():
    x = jnp.asarray(RNG.normal(size=(4, 8, 8, 3)), jnp.float32)
    model = Mixed()
    variables = _randomize(model.init(jax.random.key(0), x), seed=3)
    folded = deploy.fold(model, variables, x)
    status = {path: (status, detail) for path, _, status, detail in folded.report}
    assert folded.folded == {"after_conv": "conv_a", "ibn": "conv_e", "mean_only": "dense"}
    assert status["after_relu"] == ("affine", "its input is not the direct output of a Dense/Conv/ConvTranspose")
    assert status["twice_used"] == ("affine", "the output of its producer is also used elsewhere (2 uses)")
    assert status["flax_after_add"][0] == "affine"
    assert status["layer"] == ("kept", "per-example statistics: nothing to fold")
    assert status["other_axis"] == ("affine", "statistics along other axes than the producer's output channels")
    assert status["head"] == ("materialized", "g * v / ||v||")
    assert [r[1] for r in folded.report if r[0] == "flax_after_add"] == ["BatchNorm"]
    # Affine normalizers hold their map; IBN keeps its instance part and loses its batch part's.
    params = folded.variables["params"]
    assert sorted(params["after_relu"]) == ["add", "mean", "mul"] and "after_conv" not in params
    assert sorted(params["ibn"]) == ["BN", "IN"] and sorted(params["ibn"]["BN"]) == ["mean", "mul"]
    assert sorted(params["head"]) == ["bias", "kernel"]
    x2 = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)
    want = model.apply(variables, x2)
    _assert_folded_equal(folded(x2), want)
    # Under jit, with the folded variables passed in as arguments.
    got = jax.jit(lambda v, x: folded.apply(v, x))(folded.variables, x2)
    _assert_folded_equal(got, want)


def test_shared_modules_are_not_folded():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv, bn = nn.Conv(3, (3, 3)), normzoo.BatchNorm(use_running_average=True)
            y = bn(conv(bn(conv(x))))
            return y, bn(y.mean((1, 2)))  # the same BatchNorm on another rank: a map per call

    x = jnp.asarray(RNG.normal(size=(2, 5, 5, 3)), jnp.float32)
    v = _randomize(Shared().init(jax.random.key(0), x))
    folded = deploy.fold(Shared(), v, x)
    assert folded.report == (("BatchNorm_0", "BatchNorm", "kept", "called more than once (shared weights): one map per call"),) * 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), folded(x), Shared().apply(v, x))


def test_fold_refuses_what_it_cannot_see():
    class Tied(nn.Module):  # the Dense kernel is read again, not through the layer's output
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3)
            y = normzoo.BatchNorm(use_running_average=True)(dense(x))
            return y + x @ dense.variables["params"]["kernel"]

    x = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    v = _randomize(Tied().init(jax.random.key(0), x))
    with pytest.raises(ValueError, match=r"fold: the folded model's outputs differ from the model's on the sample "
                                         r"input .*tied weights.*Folded pairs: \{'BatchNorm_0': 'Dense_0'\}"):
        deploy.fold(Tied(), v, x)

    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(Pair)("Dense", "BatchNorm")(x)

    v = _randomize(Remat().init(jax.random.key(0), x))
    with pytest.raises(ValueError, match=r"fold: a normalizer or producer runs inside a lifted transform \(nn.remat"):
        deploy.fold(Remat(), v, x)


def test_fold_in_training_mode_is_an_error():
    x = jnp.ones((2, 4, 4, 3))
    model = Mixed()
    v = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"fold: the BatchNorm at 'after_conv' ran in training mode "
                                         r"\(use_running_average=False\): pass fold the model's inference-mode "
                                         r"arguments \(e.g. train=False\)"):
        deploy.fold(model, v, x, train=True)


def test_fold_with_large_means_loses_no_more_than_the_unfolded_model():
    """A Dense whose outputs sit at 1e4 +- 1 (bias 1e4), BatchNorm's mean there: float32 folded
    vs unfolded, both against float64 NumPy."""
    x = RNG.normal(size=(64, 5)).astype(np.float32)
    model = Pair("Dense", "BatchNorm", True)
    v = model.init(jax.random.key(0), x)
    kernel = np.asarray(v["params"]["Dense_0"]["kernel"], np.float64)
    bias = np.full(6, 1e4)
    y = x.astype(np.float64) @ kernel + bias
    mean, var = y.mean(0), y.var(0)
    v = {"params": {"Dense_0": {"kernel": v["params"]["Dense_0"]["kernel"], "bias": jnp.asarray(bias, jnp.float32)},
                    "BatchNorm_0": v["params"]["BatchNorm_0"]},
         "batch_stats": {"BatchNorm_0": {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}}}
    exact = (y - mean.astype(np.float32)) / np.sqrt(var.astype(np.float32).astype(np.float64) + 1e-5)
    unfolded = np.abs(np.asarray(model.apply(v, x)) - exact).max()
    folded = np.abs(np.asarray(deploy.fold(model, v, x)(x)) - exact).max()
    assert folded <= 2 * unfolded + 1e-6, (folded, unfolded)
    assert folded < 5e-3  # float32 at 1e4: ulp 1e-3


CIFAR_NAMES = normzoo.available()


@pytest.mark.parametrize("model_name,norm", some_slow(
    [(m, n) for m in ("resnet20", "vgg") for n in CIFAR_NAMES],
    fast={("resnet20", "batch")}, ids=lambda v: f"{v[0]}-{v[1]}"))
def test_fold_cifar_models_every_registry_name(model_name, norm):
    from examples.cifar.models import VGG, ResNet20

    model = (ResNet20(norm=norm, width=8, blocks_per_stage=1) if model_name == "resnet20"
             else VGG(norm=norm, stages=((8,), (16,), (16, 16))))
    x = jnp.asarray(RNG.normal(size=(4, 32, 32, 3)), jnp.float32)
    variables = _randomize(model.init(jax.random.key(0), x, train=False), seed=4)
    folded = deploy.fold(model, variables, x, train=False)
    # BatchNorm, its variants, IBN and frozen BatchNorm: folded; EvoNorm-B0 (batch statistics inside
    # a normalization-activation layer, not an affine map) and IterNorm (a matrix across channels): kept
    batch_family = (normzoo.make(norm).batch_statistics or norm == "frozen_batch") and norm not in ("evonorm_b0", "iter")
    statuses = {s for _, _, s, _ in folded.report}
    assert statuses == ({"folded", "kept"} if (norm, model_name) == ("ibn_b", "resnet20") else {"folded"} if batch_family
                        else {"materialized"} if norm == "weight" else set() if norm == "none" else {"kept"}), folded.report
    if batch_family:
        assert "batch_stats" not in folded.variables
    x2 = jnp.asarray(RNG.normal(size=x.shape), jnp.float32)
    want = model.apply(variables, x2, train=False)
    _assert_folded_equal(folded(x2, train=False), want)


# ----------------------------------------------------------------------------- precise BN, AdaBN


class TwoLayers(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense -> (normzoo) BatchRenorm / (flax) BatchNorm."""

    flax_second: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = normzoo.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(nn.Dense(4)(x))
        x = nn.Dense(3)(nn.relu(x))
        if self.flax_second:
            return nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
        return normzoo.BatchRenorm(use_running_average=not train, warmup_steps=0, axis_name=self.axis_name)(x)


def _numpy_precise(variables, batches, flax_second):
    """The two layers' per-batch statistics in float64, forward in training mode, averaged."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    means1, vars1, means2, vars2 = [], [], [], []
    second = "BatchNorm_1" if flax_second else "BatchRenorm_0"
    for x in batches:
        h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        m1, v1 = h.mean(0), h.var(0)
        h = (h - m1) / np.sqrt(v1 + 1e-5) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
        h = np.maximum(h, 0) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        means1.append(m1), vars1.append(v1), means2.append(h.mean(0)), vars2.append(h.var(0))
    new = {"BatchNorm_0": {"mean": np.mean(means1, 0), "var": np.mean(vars1, 0)},
           second: {"mean": np.mean(means2, 0), "var": np.mean(vars2, 0)}}
    if not flax_second:
        new[second]["steps"] = s[second]["steps"]
    return new


@pytest.mark.parametrize("flax_second", [False, True])
def test_precise_batch_stats_is_the_exact_average_of_per_batch_statistics(flax_second):
    model = TwoLayers(flax_second)
    batches = [jnp.asarray(RNG.normal(size=(32, 5)) * 3 + 2, jnp.float32) for _ in range(5)]
    variables = _randomize(model.init(jax.random.key(0), batches[0], train=False), seed=5)
    if not flax_second:  # steps stay; BatchRenorm's r and d are active in training mode
        variables["batch_stats"]["BatchRenorm_0"]["steps"] = jnp.asarray(7, jnp.int32)
    new = deploy.precise_batch_stats(model, variables, batches, train=True)
    want = _numpy_precise(variables, batches, flax_second)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-5), new["batch_stats"], want)
    assert new["params"] is variables["params"]
    if not flax_second:
        assert int(new["batch_stats"]["BatchRenorm_0"]["steps"]) == 7
    # One batch: that batch's statistics, the same numbers batch_statistics gives.
    one = deploy.precise_batch_stats(model, variables, batches[:1], train=True)["batch_stats"]
    direct = jax.device_get(deploy.batch_statistics(model, variables, batches[0], train=True))
    for layer in one:
        for k in ("mean", "var"):
            np.testing.assert_allclose(one[layer][k], direct[layer][k], rtol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("mapper", ["jit_sharding", "shard_map", pytest.param("pmap", marks=pytest.mark.slow)])
def test_precise_batch_stats_on_8_devices_equals_one_device(mapper):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    batches = [jnp.asarray(RNG.normal(size=(32, 5)) * 3 + 2, jnp.float32) for _ in range(3)]
    model = TwoLayers()
    variables = _randomize(model.init(jax.random.key(0), batches[0], train=False), seed=6)
    want = deploy.precise_batch_stats(model, variables, batches, train=True)["batch_stats"]
    mesh = jax.make_mesh((8,), ("batch",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))  # noqa: E731
    if mapper == "jit_sharding":
        got = deploy.precise_batch_stats(model, variables, [put(b) for b in batches], train=True)
    elif mapper == "pmap":
        synced = TwoLayers(axis_name="batch")
        mapped = jax.pmap(lambda v, x: deploy.batch_statistics(synced, v, x, train=True), axis_name="batch",
                          in_axes=(None, 0))
        stats = lambda v, x: jax.tree.map(lambda a: a[0], mapped(v, x.reshape((8, -1) + x.shape[1:])))  # noqa: E731
        got = deploy.precise_batch_stats(synced, variables, batches, statistics=stats)
    else:
        synced = TwoLayers(axis_name="batch")
        stats = jax.jit(jax.shard_map(lambda v, x: deploy.batch_statistics(synced, v, x, train=True),
                                      mesh=mesh, in_specs=(P(), P("batch")), out_specs=P()))
        got = deploy.precise_batch_stats(synced, variables, [put(b) for b in batches], statistics=stats)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got["batch_stats"], want)


def test_adabn_on_a_shifted_domain_has_the_known_answer():
    """Source N(0, 1), target N(3, 2^2) per feature: after AdaBN the running statistics are the
    target batches' average statistics and the target's outputs are standardized again."""
    bn = normzoo.BatchNorm()
    target = [jnp.asarray(RNG.normal(3, 2, size=(256, 4)), jnp.float32) for _ in range(4)]
    variables = bn.init(jax.random.key(0), target[0], use_running_average=True)  # source: 0 and 1
    before = bn.apply(variables, jnp.concatenate(target), use_running_average=True)
    assert abs(float(before.mean()) - 3) < 0.2
    adapted = deploy.adabn(bn, variables, target, use_running_average=False)
    stats = adapted["batch_stats"]
    np.testing.assert_allclose(stats["mean"], np.mean([np.asarray(t).mean(0) for t in target], 0), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], np.mean([np.asarray(t).var(0) for t in target], 0), rtol=1e-5)
    after = np.asarray(bn.apply(adapted, jnp.concatenate(target), use_running_average=True))
    np.testing.assert_allclose(after.mean(0), 0, atol=0.03)
    np.testing.assert_allclose(after.std(0), 1, atol=0.03)


def test_batch_statistics_mutates_no_module_and_reads_flax_layers_too():
    """Each layer runs as a copy with momentum 0: the model's own modules keep their fields, and
    flax's nn.BatchNorm, our layers and IBN give their batch's statistics, under jit."""
    model = TwoLayers(True)
    x = jnp.asarray(RNG.normal(size=(32, 5)) * 3 + 2, jnp.float32)
    variables = _randomize(model.init(jax.random.key(0), x, train=False), seed=4)
    before = repr(model)
    stats = jax.jit(lambda v, x: deploy.batch_statistics(model, v, x, train=True))(variables, x)
    assert repr(model) == before
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    one = deploy.precise_batch_stats(model, variables, [x], train=True)["batch_stats"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats, one)
    ibn = normzoo.IBN(use_running_average=False)
    xi = jnp.asarray(RNG.normal(size=(8, 3, 3, 4)) + 5, jnp.float32)
    s = deploy.batch_statistics(ibn, ibn.init(jax.random.key(0), xi), xi)["BN"]
    np.testing.assert_allclose(s["mean"], np.asarray(xi)[..., 2:].mean((0, 1, 2)), rtol=1e-6)
    assert ibn.momentum == 0.99


class _Noisy(nn.Module):
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x):
        x = normzoo.NoisyBatchNorm(use_running_average=False, momentum=self.momentum)(x)
        return normzoo.BatchNorm(use_running_average=False, momentum=self.momentum)(nn.Dense(3)(x))


class _Owner(nn.Module):
    """A user block with flax-style fields of its own, owning a flax BatchNorm."""

    use_running_average: bool = False
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=self.use_running_average, momentum=0.99)(nn.Dense(4)(x))


class _Lifted(nn.Module):
    wrap: str

    @nn.compact
    def __call__(self, x):
        if self.wrap == "scan":
            def body(mdl, c, _):
                return nn.tanh(normzoo.BatchNorm(use_running_average=False)(nn.Dense(3)(c))), None
            return nn.scan(body, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True},
                           length=3)(self, x, None)[0]
        if self.wrap == "vmap":
            return nn.vmap(_Owner, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True})()(
                jnp.stack([x, x + 1]))
        return nn.remat(_Owner)()(x)


@pytest.mark.parametrize("lifted", ["remat", pytest.param("scan", marks=pytest.mark.slow),
                                    pytest.param("vmap", marks=pytest.mark.slow)])
def test_batch_statistics_through_lifted_transforms_nested_blocks_and_rng_streams(lifted):
    """The batch's statistics are those a training pass with momentum 0 leaves, in every case."""
    x = jnp.asarray(RNG.normal(size=(32, 3)) * 3 + 2, jnp.float32)

    def recovered(model, v, momentum, **kw):  # a plain training pass: new = m * old + (1 - m) * batch
        new = model.apply(v, x, mutable=["batch_stats"], **kw)[1]["batch_stats"]
        return jax.tree.map(lambda n, o: (n - momentum * o) / (1 - momentum), new, v["batch_stats"])

    cases = [(_Noisy(), 0.9, {"rngs": {"noise": jax.random.key(5)}}), (_Lifted(lifted), 0.99, {})]
    for model, momentum, kw in cases:
        v = model.init(jax.random.key(1), x)
        got = jax.jit(lambda v: deploy.batch_statistics(model, v, x, **kw))(v)
        assert jax.tree.structure(got) == jax.tree.structure(v["batch_stats"])
        assert all(isinstance(a, jax.Array) and a.shape == b.shape
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v["batch_stats"])))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3), got,
                     recovered(model, v, momentum, **kw))
    # The owner's own BatchNorm (momentum 0.99 of its own) gives the batch's mean, not its average.
    v = _Owner().init(jax.random.key(1), x)
    h = nn.Dense(4).apply({"params": v["params"]["Dense_0"]}, x)
    np.testing.assert_allclose(deploy.batch_statistics(_Owner(), v, x)["BatchNorm_0"]["mean"], h.mean(0), rtol=1e-5)
    # NoisyBatchNorm draws what a training pass draws: the next layer sees the same noise.
    v = _Noisy(0.0).init(jax.random.key(1), x)
    trained = _Noisy(0.0).apply(v, x, rngs={"noise": jax.random.key(5)}, mutable=["batch_stats"])[1]["batch_stats"]
    got = deploy.batch_statistics(_Noisy(), v, x, rngs={"noise": jax.random.key(5)})
    np.testing.assert_allclose(got["BatchNorm_0"]["mean"], trained["BatchNorm_0"]["mean"], rtol=1e-6)


def test_batch_statistics_of_a_layer_used_through_affine_map():
    class Mapped(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return normzoo.BatchNorm(use_running_average=not train, name="b").affine_map(x)(x)

    x = jnp.asarray(RNG.normal(7, 3, size=(64, 2)), jnp.float32)
    v = Mapped().init(jax.random.key(0), x, train=False)
    stats = deploy.batch_statistics(Mapped(), v, x, train=True)["b"]
    np.testing.assert_allclose(stats["mean"], np.asarray(x).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], np.asarray(x).var(0), rtol=1e-5)


def test_statistics_errors():
    model = TwoLayers()
    x = jnp.ones((4, 5))
    v = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=r"batch_statistics: no layer computed batch statistics .* pass the "
                                         r"model's training-mode arguments, e.g. train=True"):
        deploy.precise_batch_stats(model, v, [x], train=False)
    with pytest.raises(ValueError, match=r"precise_batch_stats: `batches` yielded no batch; give at least one"):
        deploy.precise_batch_stats(model, v, [], train=True)


# ----------------------------------------------------------------------------- checkpoints


class Zoo(nn.Module):
    """Every normalizer flax also has, from one namespace: flax.linen's or normzoo's."""

    ns: str

    @nn.compact
    def __call__(self, x, train: bool):
        lib = nn if self.ns == "flax" else normzoo
        x = lib.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(x))
        x = lib.LayerNorm()(x)
        x = lib.GroupNorm(num_groups=3)(x)
        x = lib.RMSNorm()(x)
        return lib.InstanceNorm()(x)


def test_flax_linen_variables_load_into_normzoo_and_back():
    x = jnp.asarray(RNG.normal(size=(4, 6, 6, 3)) + 3, jnp.float32)
    theirs, ours = Zoo("flax"), Zoo("normzoo")
    v_flax = _randomize(theirs.init(jax.random.key(0), x, train=False), seed=7)
    v_ours = ours.init(jax.random.key(1), x, train=False)
    assert jax.tree.structure(v_flax) == jax.tree.structure(v_ours)
    assert jax.tree.map(jnp.shape, v_flax) == jax.tree.map(jnp.shape, v_ours)
    for v in (v_flax, _randomize(v_ours, seed=8)):  # each model's variables in the other
        for train in (False, True):
            want, w_upd = theirs.apply(v, x, train=train, mutable=["batch_stats"])
            got, g_upd = ours.apply(v, x, train=train, mutable=["batch_stats"])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_upd, w_upd)


class TorchLike(nn.Module):
    """Conv -> BatchNorm -> relu -> global average -> Dense, as the PyTorch model below."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = normzoo.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(x).mean(axis=(1, 2))
        x = normzoo.LayerNorm(epsilon=1e-5, name="ln")(x)  # PyTorch's epsilon (flax's: 1e-6)
        return nn.Dense(5, name="fc")(x)


NAMES = {"0": "conv", "1": "bn", "3": "ln", "4": "fc"}


def _torch_model(torch):
    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Sequential(Mean(), torch.nn.LayerNorm(4)), torch.nn.Linear(4, 5))


def test_pytorch_batch_norm_group_norm_and_whole_model_side_by_side():
    torch = pytest.importorskip("torch", reason="optional: pip install 'normzoo[torch]' (CPU wheel) runs "
                                                "normzoo against PyTorch itself")
    torch.manual_seed(0)
    net = _torch_model(torch).double().float()
    names = {"0": "conv", "1": "bn", "3.1": "ln", "4": "fc"}
    batches = [RNG.normal(1, 2, size=(8, 3, 6, 6)).astype(np.float32) for _ in range(3)]
    nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))  # noqa: E731
    model = TorchLike()
    template = model.init(jax.random.key(0), nhwc(batches[0]), train=False)
    variables = deploy.from_torch({k: v.numpy() for k, v in net.state_dict().items()}, template, names)
    net.train()
    for b in batches:  # three training steps in both (no parameter updates): outputs and statistics
        want = net(torch.from_numpy(b)).detach().numpy()
        got, upd = model.apply(variables, nhwc(b), train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        variables = {**variables, **upd}
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    converted = deploy.from_torch(state, template, names, batch_elements=8 * 6 * 6)
    np.testing.assert_allclose(converted["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(converted["batch_stats"]["bn"]["var"], variables["batch_stats"]["bn"]["var"], rtol=1e-5)
    assert not np.allclose(state["1.running_var"], variables["batch_stats"]["bn"]["var"], rtol=1e-5)  # conversion mattered
    # Inference as PyTorch's: with its running variance kept (the default), the same outputs.
    net.eval()
    x = batches[0]
    np.testing.assert_allclose(model.apply(deploy.from_torch(state, template, names), nhwc(x), train=False),
                               net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    # Export: strict loading, the same numbers back (num_batches_tracked included).
    exported = deploy.to_torch(variables, names, num_batches_tracked=3, batch_elements=8 * 6 * 6)
    net2 = _torch_model(torch).eval()
    net2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in exported.items()}, strict=True)
    for k, v in state.items():
        np.testing.assert_allclose(exported[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # GroupNorm too.
    gn = torch.nn.GroupNorm(2, 6)
    torch.nn.init.uniform_(gn.weight), torch.nn.init.uniform_(gn.bias)
    ours = normzoo.GroupNorm(num_groups=2, epsilon=1e-5)
    g = RNG.normal(3, 2, size=(4, 6, 5, 5)).astype(np.float32)
    gv = deploy.from_torch({f"g.{k}": v.detach().numpy() for k, v in gn.state_dict().items()},
                           ours.init(jax.random.key(0), nhwc(g)), {"g": ""})
    np.testing.assert_allclose(ours.apply(gv, nhwc(g)), np.transpose(gn(torch.from_numpy(g)).detach().numpy(), (0, 2, 3, 1)),
                               rtol=1e-4, atol=1e-5)


def test_pytorch_conversion_errors_name_the_key():
    x = jnp.ones((2, 6, 6, 3))
    template = TorchLike().init(jax.random.key(0), x, train=False)
    state = deploy.to_torch(template, NAMES)
    assert sorted(state) == ["0.bias", "0.weight", "1.bias", "1.num_batches_tracked", "1.running_mean",
                             "1.running_var", "1.weight", "3.bias", "3.weight", "4.bias", "4.weight"]
    assert state["0.weight"].shape == (4, 3, 3, 3) and state["4.weight"].shape == (5, 4)
    back = deploy.from_torch(state, template, NAMES)
    jax.tree.map(np.testing.assert_array_equal, back, template)
    with pytest.raises(ValueError, match=r"from_torch: '9.weight' has module prefix '9', which is not in `names`"):
        deploy.from_torch({**state, "9.weight": np.ones(3)}, template, NAMES)
    with pytest.raises(ValueError, match=r"from_torch: no PyTorch entry for the template's 'params/fc/bias'"):
        deploy.from_torch({k: v for k, v in state.items() if k != "4.bias"}, template, NAMES)
    with pytest.raises(ValueError, match=r"from_torch: '0.weight' gives shape \(3, 3, 3, 5\) for 'params/conv/kernel', "
                                         r"the template has \(3, 3, 3, 4\)"):
        deploy.from_torch({**state, "0.weight": np.ones((5, 3, 3, 3))}, template, NAMES)
    with pytest.raises(ValueError, match=r"from_torch: '1.momentum' has no Flax counterpart"):
        deploy.from_torch({**state, "1.momentum": np.ones(4)}, template, NAMES)
    with pytest.raises(ValueError, match=r"from_torch: converting '1.running_var' needs '1.num_batches_tracked'"):
        deploy.from_torch({k: v for k, v in state.items() if k != "1.num_batches_tracked"}, template, NAMES,
                          batch_elements=10)
    with pytest.raises(ValueError, match=r"to_torch: converting the variance of 'bn' needs its number of updates: "
                                         r"pass num_batches_tracked"):
        deploy.to_torch(template, NAMES, batch_elements=10)
    with pytest.raises(ValueError, match=r"to_torch: names\['5'\] = 'nowhere', a path with no variables"):
        deploy.to_torch(template, {**NAMES, "5": "nowhere"})


def test_serialization_round_trips_and_a_resumed_run_continues_identically(tmp_path):
    """flax.serialization and orbax: bit-exact params + batch_stats (BatchRenorm's step counter
    included), and 3 + 3 steps after a restore equal 6 straight steps."""
    import optax
    from flax import serialization

    model = TwoLayers()
    xs = [jnp.asarray(RNG.normal(size=(16, 5)) + 1, jnp.float32) for _ in range(6)]
    tx = optax.sgd(0.1)
    variables = model.init(jax.random.key(0), xs[0], train=False)

    @jax.jit
    def step(state, x):
        params, stats, opt = state

        def loss(p):
            y, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((y - 1.0) ** 2), upd["batch_stats"]

        g, new_stats = jax.grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), new_stats, opt

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    straight = state
    for x in xs:
        straight = step(straight, x)
    half = state
    for x in xs[:3]:
        half = step(half, x)
    assert int(half[1]["BatchRenorm_0"]["steps"]) == 3
    # flax.serialization
    restored = serialization.from_bytes(half, serialization.to_bytes(half))
    jax.tree.map(np.testing.assert_array_equal, restored, half)
    # orbax
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": half[0], "batch_stats": half[1], "opt": half[2]})
        ckpt.wait_until_finished()
        back = ckpt.restore(tmp_path / "ckpt", {"params": half[0], "batch_stats": half[1], "opt": half[2]})
    resumed = (back["params"], back["batch_stats"], back["opt"])
    jax.tree.map(np.testing.assert_array_equal, resumed, half)
    assert back["batch_stats"]["BatchRenorm_0"]["steps"].dtype == jnp.int32
    for x in xs[3:]:
        resumed = step(resumed, x)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


# ----------------------------------------------------------------------------- the CIFAR example


def test_corruptions_are_deterministic_and_do_what_they_say():
    from examples.cifar.deploy import CORRUPTIONS, corrupt

    images = np.asarray(RNG.integers(40, 216, size=(6, 32, 32, 3)), np.uint8)
    x = images.astype(np.float64) / 255
    for name in CORRUPTIONS:
        out = [corrupt(images, name, s) for s in (1, 2, 3)]
        assert all(o.dtype == np.uint8 and o.shape == images.shape for o in out)
        np.testing.assert_array_equal(out[0], corrupt(images, name, 1))  # same images twice
        change = [np.abs(o.astype(np.float64) / 255 - x).mean() for o in out]
        assert 0 < change[0] < change[1] < change[2], (name, change)  # severity orders the shift
    brighter = corrupt(images, "brightness", 2).astype(np.float64) / 255
    np.testing.assert_allclose(brighter, np.clip(x + 0.2, 0, 1), atol=0.5 / 255 + 1e-9)
    flat = corrupt(images, "contrast", 3).astype(np.float64) / 255
    np.testing.assert_allclose(flat.std(axis=(1, 2, 3)), 0.25 * x.std(axis=(1, 2, 3)), rtol=0.02)
    blurred = corrupt(images, "blur", 3).astype(np.float64) / 255
    np.testing.assert_allclose(blurred.mean(), x.mean(), atol=2e-3)  # a blur keeps the mean
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(x, axis=1)).mean()
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'"):
        corrupt(images, "fog", 1)


@pytest.mark.slow
def test_deploy_example_on_a_fixture(tmp_path):
    import json

    from examples.cifar import deploy as example
    from examples.cifar import input_pipeline, train
    from examples.cifar.configs.default import get_config
    from flax import serialization

    data_dir = input_pipeline.write_fake(tmp_path / "data" / input_pipeline.FOLDER, per_file=16)
    for norm in ("batch", "ibn", "group"):
        config = get_config("tiny")
        config.norm = norm
        model = train.build_model(config)
        v = _randomize(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False), seed=9)
        run = tmp_path / "runs" / norm
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(config.to_dict()))
        (run / "variables.msgpack").write_bytes(serialization.to_bytes({"params": v["params"], "batch_stats": v.get("batch_stats", {})}))
    example.main([f"--workdir={tmp_path / 'runs'}", f"--data_dir={data_dir}", "--expected_per_file=16",
                  "--precise-batches=3", "--batch=8", f"--out={tmp_path / 'out'}", "--no-progress"])
    result = json.loads((tmp_path / "out" / "deploy.json").read_text())
    assert sorted(result["runs"]) == ["batch", "ibn"]  # group has no batch statistics
    for o in result["runs"].values():
        assert o["folded"]["predictions_differ"] == 0 and o["folded"]["accuracy"] == o["ema"]
        assert len(o["corruptions"]) == 12 and all(0 <= c["adabn"] <= 1 for c in o["corruptions"].values())
    assert "| batch |" in (tmp_path / "out" / "deploy.md").read_text()
    assert (tmp_path / "out" / "adabn.png").stat().st_size > 0
