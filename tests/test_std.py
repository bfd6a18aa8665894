"""Weight standardization: StdConv, ScaledStdConv and their Dense forms (linen, nnx, functional)
against NumPy, flax's Conv/Dense fields and constructors, and timm's StdConv2d / ScaledStdConv2d
side by side (the torch extra)."""

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normzoo
from normzoo import deploy
from normzoo import functional as F
from normzoo import nnx as nznnx
from tests import reference as ref

RNG = np.random.default_rng(0)


def standardized(kernel, eps=1e-6, gain=None, scale=1.0):
    k = ref.f64(kernel)
    axes = tuple(range(k.ndim - 1))
    w = (k - k.mean(axes)) / np.sqrt(k.var(axes) + eps) * scale
    return w if gain is None else w * ref.f64(gain)


def test_weight_standardize_against_numpy_and_its_errors():
    k = RNG.normal(0.3, 2.0, (3, 3, 4, 5)).astype(np.float32)
    g = RNG.uniform(0.5, 2.0, 5).astype(np.float32)
    np.testing.assert_allclose(F.weight_standardize(k), standardized(k), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(F.weight_standardize(k, g, scale=0.2), standardized(k, gain=g, scale=0.2), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"weight_standardize: `gain` has shape \(4,\); the kernel of shape "
                                         r"\(3, 3, 4, 5\) has 5 outputs \(its last axis\): give gain the shape \(5,\)"):
        F.weight_standardize(k, jnp.ones(4))
    with pytest.raises(ValueError, match=r"weight_standardize: the kernel has shape \(5,\)"):
        F.weight_standardize(jnp.ones(5))


def _fields(cls):
    return [(f.name, f.default) for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


@pytest.mark.parametrize("ours,theirs", [(normzoo.StdConv, nn.Conv), (normzoo.ScaledStdConv, nn.Conv),
                                         (normzoo.StdDense, nn.Dense), (normzoo.ScaledStdDense, nn.Dense)])
def test_fields_are_flax_fields_then_keyword_only_extras(ours, theirs):
    mine, flax_fields = _fields(ours), _fields(theirs)
    assert mine[: len(flax_fields)] == flax_fields
    assert all(f.kw_only for f in dataclasses.fields(ours) if f.name in dict(mine[len(flax_fields):]))


@pytest.mark.parametrize("ours,theirs,extra", [(nznnx.StdLinear, nnx.Linear, ["epsilon"]),
                                               (nznnx.ScaledStdConv, nnx.Conv, ["gamma", "epsilon", "gain_init"])])
def test_nnx_constructors_are_flax_nnx_then_keywords(ours, theirs, extra):
    mine = list(inspect.signature(ours.__init__).parameters)
    flax_params = list(inspect.signature(theirs.__init__).parameters)
    assert mine[: len(flax_params)] == flax_params and mine[len(flax_params):] == extra


def test_layers_against_numpy_and_nnx_twins():
    x = RNG.normal(size=(2, 6, 6, 4)).astype(np.float32)
    for cls, twin, scaled in [(normzoo.StdConv, nznnx.StdConv, False), (normzoo.ScaledStdConv, nznnx.ScaledStdConv, True)]:
        layer = cls(5, (3, 3), **({"gamma": 1.7} if scaled else {}))
        v = layer.init(jax.random.key(0), x)
        v = {"params": jax.tree.map(lambda p: p + 0.2, v["params"])}
        p = v["params"]
        kernel = standardized(p["kernel"], gain=p.get("gain"), scale=1.7 / np.sqrt(36) if scaled else 1.0)
        want = ref.conv_same(x, kernel) + ref.f64(p["bias"])
        np.testing.assert_allclose(layer.apply(v, x), want, rtol=1e-4, atol=1e-4)
        module = twin(4, 5, (3, 3), **({"gamma": 1.7} if scaled else {}), rngs=nnx.Rngs(0))
        nznnx.from_linen(module, v)
        np.testing.assert_allclose(module(jnp.asarray(x)), layer.apply(v, x), rtol=1e-6, atol=1e-6)
    xd = RNG.normal(size=(3, 7)).astype(np.float32)
    dense = normzoo.ScaledStdDense(4, gamma=2.0)
    v = dense.init(jax.random.key(0), xd)
    p = v["params"]
    np.testing.assert_allclose(dense.apply(v, xd), ref.f64(xd) @ standardized(p["kernel"], gain=p["gain"],
                                                                              scale=2.0 / np.sqrt(7)) + ref.f64(p["bias"]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaled", [False, True])
def test_side_by_side_with_timm(scaled):
    torch = pytest.importorskip("torch", reason="optional: pip install 'normzoo[torch]' runs the side-by-side tests")
    from examples.porting.torch_models import torchvision_models

    try:
        torchvision_models()
        from timm.layers import ScaledStdConv2d, StdConv2d
    except ModuleNotFoundError:
        pytest.skip("optional: timm is not installed (pip install 'normzoo[torch]')")
    theirs = (ScaledStdConv2d(4, 5, 3, padding=1, gamma=1.7, gain_init=1.3) if scaled
              else StdConv2d(4, 5, 3, padding=1, bias=True))
    with torch.no_grad():
        theirs.weight.add_(0.3)
        theirs.bias.copy_(torch.linspace(-1, 1, 5))
    state = {k: t.detach().numpy() for k, t in torch.nn.Sequential(theirs).state_dict().items()}
    layer = normzoo.ScaledStdConv(5, (3, 3), gamma=1.7) if scaled else normzoo.StdConv(5, (3, 3))
    x = RNG.normal(size=(2, 4, 6, 6)).astype(np.float32)
    template = nn.Sequential([layer]).init(jax.random.key(0), np.moveaxis(x, 1, -1))
    v = deploy.from_torch(state, template, {"0": "layers_0"})
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = theirs(xt)
    (yt**2).sum().backward()
    f = lambda x: nn.Sequential([layer]).apply(v, x)  # noqa: E731
    y, pullback = jax.vjp(f, jnp.moveaxis(x, 1, -1))
    (gx,) = pullback(2 * y)
    np.testing.assert_allclose(np.moveaxis(y, -1, 1), yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.moveaxis(gx, -1, 1), xt.grad.numpy(), rtol=1e-3, atol=1e-3)
    back = deploy.to_torch(v, {"0": "layers_0"}, shapes={k: a.shape for k, a in state.items()})
    jax.tree.map(np.testing.assert_array_equal, back, state)
