"""normzoo's layers as ``flax.nnx`` modules: ``from normzoo import nnx as nznnx``.

Each class here is a drop-in for its ``flax.nnx`` counterpart (where flax has one): the same
constructor, ``num_features`` first and then flax's keyword arguments in flax's order with
flax's defaults, ``rngs``, and the same variables (``nnx.Param`` ``scale``/``bias``,
``nnx.BatchStat`` ``mean``/``var``), so ``nnx.state`` of a flax.nnx model loads into the
normzoo one and back. ``model.train()`` / ``model.eval()`` / ``nnx.view`` and
``use_running_average`` at call time work as in flax.nnx (the call's value wins).
normzoo's own options (``virtual_batch_size``, BatchRenorm's bounds, ...) follow flax's
arguments, keyword-only, with the linen layer's defaults.

One implementation of the maths: a layer here holds its variables and configuration and
runs the linen layer's own ``_map`` (statistics, renormalization, ghost batches, the output
map; ``normzoo._batch`` and ``normzoo._sample``) against them, through :class:`_Scope`,
which gives that code the few Module methods it uses (``param``, ``variable``,
``is_initializing``, ...) backed by this module's ``nnx.Variable`` s. The variables
themselves are created the same way: at construction the linen code runs once, in its
initializing mode, on a placeholder input with ``num_features`` channels.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from normzoo import nnx as nznnx
  >>> bn = nznnx.BatchNorm(3, rngs=nnx.Rngs(0))
  >>> x = jax.random.normal(jax.random.key(1), (8, 3)) + 1e4
  >>> y = bn(x)                     # training mode: batch statistics, running ones updated
  >>> round(float(y.std()), 3), bn.mean[...].round(0).tolist()
  (1.0, [100.0, 100.0, 100.0])
  >>> bn.eval()                     # use_running_average=True, as flax.nnx
  >>> bool(jnp.allclose(bn(x), (x - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5), atol=1e-3))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import dtypes as _linen_dtypes
from flax.nnx.nn import dtypes as _flax_dtypes
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init

from normzoo import _batch, _composite, _registry, _sample, _weight
from normzoo._stats import AffineMap

Array = jax.Array

__all__ = ["BatchNorm", "BatchRenorm", "CosineConv", "CosineLinear", "GroupNorm", "IBN", "Identity", "InstanceNorm",
           "LayerNorm", "LpBatchNorm", "MeanOnlyBatchNorm", "NoisyBatchNorm", "RMSNorm", "WeightNormConv", "WeightNormLinear", "from_linen",
           "make", "to_linen"]


# ----------------------------------------------------------------------------- the bridge to the shared code


class _Handle:
    """``mdl.variable(...)``'s result for the shared code: ``.value`` reads and writes an nnx.Variable."""

    def __init__(self, variable: nnx.Variable):
        self._variable = variable

    @property
    def value(self):
        return self._variable[...]

    @value.setter
    def value(self, new):
        # Running statistics are state, never differentiated (flax.nnx stops gradients too).
        self._variable[...] = jax.lax.stop_gradient(new)


class _Scope:
    """What the linen layers' ``_map`` code asks of ``self``, answered by an nnx module.

    Field names read the nnx module's attributes (``overrides`` first); the linen class's
    helper methods (``_params``, ``_correction``, ...) run bound to this scope; ``param`` and
    ``variable`` return the module's ``nnx.Param`` / ``nnx.BatchStat`` values, creating them
    while ``creating`` (construction), with keys drawn from ``rngs.params()`` in the order
    the code asks for them (flax.nnx's order: ``scale`` before ``bias``).
    """

    def __init__(self, module: nnx.Module, creating: _Creating | None, overrides: Mapping[str, Any]):
        self._module, self._creating, self._overrides = module, creating, overrides
        self._fields = _linen_fields(type(module)._linen)

    def __getattr__(self, name: str):
        if name in self._overrides:
            return self._overrides[name]
        if name == "axis_name" and self._creating is not None:
            return None  # construction runs outside any mapped context
        if name in self._fields:
            return getattr(self._module, name)
        method = getattr(type(self._module)._linen, name)  # a helper of the linen layer
        return method.__get__(self)

    def is_initializing(self) -> bool:
        return self._creating is not None

    def make_rng(self, name: str):
        stream = getattr(self._module, "rngs", None)
        if stream is None:
            raise ValueError(
                f"{type(self._module).__name__}: no rng stream {name!r} to draw the noise from; build the "
                f"layer with rngs=nnx.Rngs(params=..., {name}=...) (or nnx.Rngs(0))."
            )
        return stream()

    def has_variable(self, collection: str, name: str) -> bool:
        return isinstance(getattr(self._module, name, None), _KIND[collection])

    def get_variable(self, collection: str, name: str):
        return getattr(self._module, name)[...]

    def param(self, name: str, init, shape, dtype):
        if self._creating is not None:
            key = self._creating.rngs.params()
            setattr(self._module, name, nnx.Param(init(key, shape, dtype), **self._creating.metadata.get(name, {})))
        return self._existing("params", name)[...]

    def variable(self, collection: str, name: str, init, *args):
        if self._creating is not None:
            setattr(self._module, name, _KIND[collection](init(*args)))
        return _Handle(self._existing(collection, name))

    def _existing(self, collection: str, name: str) -> nnx.Variable:
        if not self.has_variable(collection, name):
            raise ValueError(
                f"{type(self._module).__name__}: no {collection}[{name!r}] variable; it is created "
                "at construction, so this layer was configured differently from the one whose "
                "variables were loaded into it."
            )
        return getattr(self._module, name)


_KIND = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


@dataclasses.dataclass(frozen=True)
class _Creating:
    """Construction: where parameter keys come from, and each parameter's nnx metadata."""

    rngs: nnx.Rngs
    metadata: Mapping[str, Mapping[str, Any]]


@functools.cache
def _linen_fields(linen_cls) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(linen_cls) if f.name not in ("parent", "name"))


@functools.cache
def _scope_type(name: str) -> type:
    # Error messages of the shared code name ``type(self).__name__``: the layer's name.
    return type(name, (_Scope,), {})


def _placeholder(num_features, feature_axes, other_axes=(), batch: int = 1) -> Array:
    """A zero input with ``num_features`` on ``feature_axes`` and 1 elsewhere (``batch`` on
    axis 0), of the smallest rank in which every axis named exists."""
    feature_shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    feature_axes = (feature_axes,) if isinstance(feature_axes, int) else tuple(feature_axes)
    if len(feature_shape) != len(feature_axes):
        raise ValueError(
            f"num_features={num_features!r} must give one size per feature axis {feature_axes!r}; "
            "pass an int for a single feature axis or a tuple of sizes."
        )
    other_axes = (other_axes,) if isinstance(other_axes, int) else tuple(other_axes or ())
    axes = feature_axes + other_axes
    # Room for the positive axes, then the negative ones, none of them axis 0 unless named so.
    rank = max(2, 1 + max([a + 1 for a in axes if a >= 0], default=0) + max([-a for a in axes if a < 0], default=0))
    shape = [1] * rank
    shape[0] = batch
    for a, n in zip(feature_axes, feature_shape):
        shape[a] = n
    return jnp.zeros(shape, jnp.float32)


class _Layer(nnx.Module):
    """The shell: configuration and variables here, the maths in ``_linen``'s ``_map``."""

    _linen: type  # the linen layer whose code runs
    _optional = ("scale", "bias")  # parameters that are None when unused, as in flax.nnx

    def _configure(self, config: dict, metadata: dict, rngs: nnx.Rngs, placeholder: Array) -> None:
        if config.get("promote_dtype", _flax_dtypes.promote_dtype) is not _flax_dtypes.promote_dtype:
            raise ValueError(
                f"{type(self).__name__}: promote_dtype={config['promote_dtype']!r} is not supported: "
                "normzoo promotes as flax's default (flax.nnx.nn.dtypes.promote_dtype) and keeps its "
                "statistics in at least float32; use `dtype` to choose the output dtype."
            )
        for name, value in config.items():
            setattr(self, name, value)
        # The linen code, initializing, creates the variables (flax.nnx's names and order).
        try:
            self._run(placeholder, creating=_Creating(rngs, metadata))
        except ValueError as e:
            raise type(e)(f"{e} (at construction: num_features and the axes are checked on a "
                          f"placeholder input of shape {tuple(placeholder.shape)})") from None
        for name in self._optional:  # as flax.nnx: None where the parameter is not used
            if not hasattr(self, name):
                setattr(self, name, nnx.data(None))

    def _scope(self, creating: _Creating | None, overrides: Mapping[str, Any]) -> _Scope:
        return _scope_type(type(self).__name__)(self, creating, overrides)


def _first_from(call, attribute, layer: str):
    # flax.nnx's rule: the call's value wins over the attribute; one of them is required.
    value = call if call is not None else attribute
    if value is None:
        raise ValueError(
            f"{layer}: no use_running_average given; pass it to the constructor, to the call, "
            f"or set it with model.train() / model.eval() / nnx.view(model, use_running_average=...)."
        )
    return value


# ----------------------------------------------------------------------------- batch family


class _BatchLayer(_Layer):
    def _run(self, x, *, use_running_average=True, mask=None, creating=None) -> AffineMap:
        overrides = {"use_running_average": None, "force_float32_reductions": True}
        if self.dtype is None and creating is None:
            # flax.nnx promotes x with the (float32) running statistics and the parameters.
            params = [v[...].dtype for v in (self.scale, self.bias) if isinstance(v, nnx.Variable)]
            overrides["dtype"] = jnp.result_type(jnp.asarray(x).dtype, jnp.float32, *params)
        scope = self._scope(creating, overrides)
        return self._linen._map(scope, x, use_running_average, mask)

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``: with batch statistics (running ones updated) or, if
        ``use_running_average`` (the call's value, else the attribute), the running ones.
        ``mask`` (boolean, broadcastable to ``x``) selects what enters the statistics."""
        return self.affine_map(x, use_running_average, mask=mask)(x)

    def affine_map(self, x: Array, use_running_average: bool | None = None, *,
                   mask: Array | None = None) -> AffineMap:
        """The map ``y = (x - mean) * mul + add`` that ``__call__`` applies (same arguments and updates)."""
        use_ra = _first_from(use_running_average, self.use_running_average, type(self).__name__)
        return self._run(x, use_running_average=use_ra, mask=mask)

    def set_view(self, use_running_average: bool | None = None):
        """For ``nnx.view``: sets ``use_running_average``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_BatchLayer):
    r"""Batch normalization as an ``nnx.Module``; drop-in for ``flax.nnx.BatchNorm``.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    with the batch's mean and (biased) variance over every axis but ``axis`` in training,
    the running ones (``r = momentum * r + (1 - momentum) * b``) with
    ``use_running_average``. The arithmetic is :class:`normzoo.BatchNorm`'s (stable variance
    in at least float32, one-collective count-weighted sync with ``axis_name``, masks, ghost
    batches); see there for the differences from flax.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> bn = nznnx.BatchNorm(4, rngs=nnx.Rngs(0))
      >>> y = bn(jax.random.normal(jax.random.key(0), (16, 4)))
      >>> sorted(nnx.state(bn, nnx.BatchStat))
      ['mean', 'var']

    Args:
      num_features: the number of channels (the size of ``axis``).
      use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
        bias_init, scale_init, axis_name, axis_index_groups, use_fast_variance,
        promote_dtype, rngs, bias_metadata, scale_metadata: as ``flax.nnx.BatchNorm``
        (``use_fast_variance`` has no effect: the variance is always stable;
        ``promote_dtype`` must be flax's default).
      virtual_batch_size: (normzoo) ghost batch size, as :class:`normzoo.BatchNorm`.
    """

    _linen = _batch.BatchNorm

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, axis, batch=virtual_batch_size or 1))


_NOT_CONFIG = ("self", "rngs", "bias_metadata", "scale_metadata", "__class__")


class BatchRenorm(_BatchLayer):
    r"""Batch renormalization (Ioffe 2017) as an ``nnx.Module`` (flax.nnx has none).

    .. math:: y = \gamma \Big(\frac{x - \mu_B}{\sigma_B} r + d\Big) + \beta

    with ``r`` and ``d`` clipped to ``[1/r_max, r_max]`` and ``[-d_max, d_max]`` and relaxed
    from (1, 0) over ``warmup_steps`` (counted in the ``steps`` BatchStat); the arithmetic is
    :class:`normzoo.BatchRenorm`'s, which documents every field. Arguments: those of
    :class:`BatchNorm`, then ``r_max``, ``d_max``, ``warmup_steps``, ``warmup_schedule``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.BatchRenorm(8, warmup_steps=100, rngs=nnx.Rngs(0))
      >>> _ = layer(jax.random.normal(jax.random.key(0), (4, 8)))
      >>> int(layer.steps[...])
      1
    """

    _linen = _batch.BatchRenorm

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        warmup_schedule: str = "linear",
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, axis, batch=virtual_batch_size or 1))


class MeanOnlyBatchNorm(_BatchLayer):
    r"""Mean-only batch normalization (Salimans & Kingma 2016) as an ``nnx.Module``.

    .. math:: y = x - \mu_B + \beta

    Arguments as :class:`BatchNorm` (``use_scale`` defaults to False); only the ``mean``
    BatchStat is kept. The arithmetic is :class:`normzoo.MeanOnlyBatchNorm`'s.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> nznnx.MeanOnlyBatchNorm(2, rngs=nnx.Rngs(0))(jnp.arange(6.0).reshape(3, 2)).tolist()
      [[-2.0, -2.0], [0.0, 0.0], [2.0, 2.0]]
    """

    _linen = _batch.MeanOnlyBatchNorm

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = False,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, axis, batch=virtual_batch_size or 1))


class LpBatchNorm(_BatchLayer):
    r"""Batch normalization by the batch's L1, L2 or L∞ deviation (Santurkar et al. 2018) as an ``nnx.Module``.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{s_p^2 + \epsilon}} + \beta

    with ``s_1 = sqrt(pi/2) E|x - mu_B|``, ``s_2`` the standard deviation, ``s_inf = max |x - mu_B|``;
    the arithmetic, running statistics (``mean``, ``var = s_p^2``) and sync are
    :class:`normzoo.LpBatchNorm`'s. Arguments: those of :class:`BatchNorm`, then ``p``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.LpBatchNorm(3, p=1, rngs=nnx.Rngs(0))
      >>> layer(jax.random.normal(jax.random.key(0), (64, 3))).shape
      (64, 3)
    """

    _linen = _batch.LpBatchNorm

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
        p: float | str = 2,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, axis, batch=virtual_batch_size or 1))


class NoisyBatchNorm(_BatchLayer):
    r"""BatchNorm followed by per-activation noise whose distribution changes every step
    (Santurkar et al. 2018's "noisy" BatchNorm) as an ``nnx.Module``.

    .. math:: y_{ij} = s_{ij}\, \mathrm{BN}(x)_{ij} + m_{ij}, \quad s_{ij} \sim \mathcal{N}(\sigma_j, w^2),
        \ m_{ij} \sim U(\mu_j - w, \mu_j + w)

    with ``mu_j``, ``sigma_j`` drawn per feature at every call; :class:`normzoo.NoisyBatchNorm`
    documents every field. Arguments: those of :class:`BatchNorm`, then ``shift_range``,
    ``scale_range``, ``noise_width``, ``rng_collection``. The keys come from the stream
    ``rngs[rng_collection]`` given at construction (forked, as ``nnx.Dropout`` does; without
    such a stream, ``rngs``' default one); no noise with ``use_running_average``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.NoisyBatchNorm(4, rngs=nnx.Rngs(params=0, noise=1))
      >>> y1, y2 = (layer(jax.random.normal(jax.random.key(0), (8, 4))) for _ in range(2))
      >>> bool((y1 != y2).any())  # new noise at every call
      True
    """

    _linen = _batch.NoisyBatchNorm

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
        shift_range: float = 0.5,
        scale_range: tuple[float, float] = (1.0, 1.25),
        noise_width: float = 0.1,
        rng_collection: str = "noise",
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, axis, batch=virtual_batch_size or 1))
        self.rngs = rngs[rng_collection].fork()


# ----------------------------------------------------------------------------- per-sample family


class _SampleLayer(_Layer):
    def _run(self, x, *, mask=None, creating=None) -> AffineMap:
        scope = self._scope(creating, {"force_float32_reductions": True})
        return self._linen._map(scope, x, mask)

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; ``mask`` (boolean, broadcastable) selects what enters the statistics."""
        return self._run(x, mask=mask)(x)


class LayerNorm(_SampleLayer):
    r"""Layer normalization as an ``nnx.Module``; drop-in for ``flax.nnx.LayerNorm``.

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    over ``reduction_axes`` per example; the arithmetic is :class:`normzoo.LayerNorm`'s.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> y = nznnx.LayerNorm(2, rngs=nnx.Rngs(0))(jnp.array([[1.0, 3.0]]) + 1e4)
      >>> [round(float(v), 3) for v in y[0]]
      [-1.0, 1.0]

    Args: as ``flax.nnx.LayerNorm`` (``num_features`` may also be a tuple of sizes, one per
    feature axis).
    """

    _linen = _sample.LayerNorm

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, feature_axes, reduction_axes))


class RMSNorm(_SampleLayer):
    r"""Root-mean-square normalization as an ``nnx.Module``; drop-in for ``flax.nnx.RMSNorm``.

    .. math:: y = \gamma \frac{x}{\sqrt{\mathrm{E}[|x|^2] + \epsilon}}

    The arithmetic is :class:`normzoo.RMSNorm`'s. Arguments: ``flax.nnx.RMSNorm``'s, then
    normzoo's ``use_bias`` (default False) and ``bias_init``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> y = nznnx.RMSNorm(2, rngs=nnx.Rngs(0))(jnp.array([[3.0, 4.0]]))
      >>> [round(float(v), 3) for v in (y * jnp.sqrt(12.5))[0]]
      [3.0, 4.0]
    """

    _linen = _sample.RMSNorm

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalizes ``x``; ``mask`` (boolean, broadcastable; positional, as in flax.nnx.RMSNorm)
        selects what enters the statistics."""
        return self._run(x, mask=mask)(x)

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        scale_init: Any = initializers.ones_init(),
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        use_bias: bool = False,
        bias_init: Any = initializers.zeros_init(),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, feature_axes, reduction_axes))


class GroupNorm(_SampleLayer):
    r"""Group normalization as an ``nnx.Module``; drop-in for ``flax.nnx.GroupNorm``.

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} + \beta_c

    The channels (last axis) form ``num_groups`` groups (or groups of ``group_size``); the
    arithmetic is :class:`normzoo.GroupNorm`'s.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> gn = nznnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))
      >>> gn(jax.random.normal(jax.random.key(0), (2, 4, 4, 8))).shape
      (2, 4, 4, 8)
    """

    _linen = _sample.GroupNorm

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        reduction_axes: Any = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, -1, reduction_axes))


class InstanceNorm(_SampleLayer):
    r"""Instance normalization as an ``nnx.Module``; drop-in for ``flax.nnx.InstanceNorm``.

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

    The arithmetic is :class:`normzoo.InstanceNorm`'s. Arguments: ``flax.nnx.InstanceNorm``'s,
    then normzoo's ``track_running_stats`` (keep running averages of the instance statistics
    in ``mean``/``var`` BatchStats), ``use_running_average`` and ``momentum``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> y = nznnx.InstanceNorm(3, rngs=nnx.Rngs(0))(jax.random.normal(jax.random.key(0), (2, 5, 5, 3)) + 7)
      >>> round(float(jnp.abs(y.mean((1, 2))).max()), 4)
      0.0
    """

    _linen = _sample.InstanceNorm

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        feature_axes: Any = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        track_running_stats: bool = False,
        use_running_average: bool | None = False,
        momentum: float = 0.99,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG}
        self._configure(config, {"bias": bias_metadata, "scale": scale_metadata}, rngs,
                        _placeholder(num_features, feature_axes))

    def _run(self, x, *, mask=None, use_running_average=True, creating=None) -> AffineMap:
        scope = self._scope(creating, {"force_float32_reductions": True, "use_running_average": None})
        return self._linen._map(scope, x, mask, use_running_average)

    def __call__(self, x: Array, *, mask: Array | None = None, use_running_average: bool | None = None) -> Array:
        """Normalizes ``x`` per example and channel (with ``track_running_stats``,
        ``use_running_average`` selects the running statistics, as in BatchNorm)."""
        # Without tracked statistics the shared code never reads it.
        use_ra = (_first_from(use_running_average, self.use_running_average, "InstanceNorm")
                  if self.track_running_stats else None)
        return self._run(x, mask=mask, use_running_average=use_ra)(x)

    def set_view(self, use_running_average: bool | None = None):
        """For ``nnx.view``: sets ``use_running_average``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class IBN(nnx.Module):
    r"""Instance-Batch Normalization, IBN-a (Pan et al. 2018), as an ``nnx.Module``.

    .. math:: y = \mathrm{concat}\big(\mathrm{IN}(x_{[:k]}),\ \mathrm{BN}(x_{[k:]})\big),\quad k = \lfloor C \cdot \mathrm{ratio} \rfloor

    Submodules ``IN`` (:class:`InstanceNorm` over ``k`` channels; None if ``k = 0``) and
    ``BN`` (:class:`BatchNorm` over the rest; None if none are left), named as the linen
    :class:`normzoo.IBN`'s; their maps are joined and applied in one pass
    (``normzoo._composite.ibn_map``, shared with linen). Arguments: :class:`BatchNorm`'s, then
    ``ratio``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> ibn = nznnx.IBN(8, ratio=0.5, rngs=nnx.Rngs(0))
      >>> ibn(jax.random.normal(jax.random.key(0), (4, 6, 6, 8))).shape, ibn.IN.scale[...].shape
      ((4, 6, 6, 8), (4,))
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        virtual_batch_size: int | None = None,
        ratio: float = 0.5,
    ):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"IBN: ratio={ratio!r} must lie in [0, 1] (the fraction of channels that are "
                "instance-normalized; 0 is BatchNorm, 1 is InstanceNorm)."
            )
        k = int(num_features * ratio)
        shared = dict(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
                      use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
                      promote_dtype=promote_dtype, rngs=rngs, bias_metadata=bias_metadata,
                      scale_metadata=scale_metadata)
        # Built in the linen layer's order (IN first), so parameter keys are drawn alike.
        self.IN = nnx.data(InstanceNorm(k, feature_axes=axis, **shared) if k > 0 else None)
        self.BN = nnx.data(BatchNorm(
            num_features - k, use_running_average=use_running_average, axis=axis, momentum=momentum,
            axis_name=axis_name, axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
            virtual_batch_size=virtual_batch_size, **shared) if k < num_features else None)
        self.num_features, self.ratio, self.axis = num_features, ratio, axis

    # The BatchNorm part's setting: model.eval(), nnx.view and set_attributes reach it directly
    # or through this attribute alike.
    @property
    def use_running_average(self) -> bool | None:
        return None if self.BN is None else self.BN.use_running_average

    @use_running_average.setter
    def use_running_average(self, value: bool | None) -> None:
        if self.BN is not None:
            self.BN.use_running_average = value

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (arguments as :meth:`BatchNorm.__call__`)."""
        return self.affine_map(x, use_running_average, mask=mask)(x)

    def affine_map(self, x: Array, use_running_average: bool | None = None, *,
                   mask: Array | None = None) -> AffineMap:
        """The joined map ``__call__`` applies (same arguments; updates BN's running statistics)."""
        return _composite.ibn_map(
            x, mask, self.ratio, self.axis,
            lambda part, mask, axis: self.IN._run(part, mask=mask),
            lambda part, mask: self.BN.affine_map(part, use_running_average, mask=mask),
        )


# ----------------------------------------------------------------------------- weight family


class _WeightLayer(_Layer):
    """Linear layers with a normalized kernel: the linen layer's ``_apply`` on this module's
    parameters. flax.nnx's ``in_features, out_features`` name what linen infers and calls
    ``features``; ``promote_dtype`` is flax's default."""

    def _run(self, x, *, creating=None) -> Array:
        overrides = {"features": self.out_features, "promote_dtype": _linen_dtypes.promote_dtype,
                     "dot_general_cls": None, "conv_general_dilated_cls": None, "data_init": False,
                     "init_scale": 1.0}
        return self._linen._apply(self._scope(creating, overrides), x)

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Applies the layer to ``inputs`` (features last). ``out_sharding`` (flax.nnx's explicit-
        sharding output spec) is not supported: leave it None."""
        if out_sharding is not None:
            raise ValueError(
                f"{type(self).__name__}: out_sharding={out_sharding!r} is not supported; leave it None "
                "and shard the result with jax.sharding.reshard if needed."
            )
        return self._run(inputs)

    def _configure(self, config, metadata, rngs, placeholder):
        if config.pop("preferred_element_type", None) is not None:
            raise ValueError(
                f"{type(self).__name__}: preferred_element_type is not supported; the normalized "
                "product is accumulated in at least float32 and returned in `dtype`."
            )
        if config.get("mask") is not None:
            config["mask"] = nnx.data(config["mask"])
        super()._configure(config, metadata, rngs, placeholder)


def _linear_placeholder(in_features: int) -> Array:
    return jnp.zeros((1, in_features), jnp.float32)


def _conv_placeholder(in_features: int, kernel_size, kernel_dilation) -> Array:
    ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    dil = (1 if kernel_dilation is None else kernel_dilation,) * len(ks) if not isinstance(
        kernel_dilation, (tuple, list)) else tuple(kernel_dilation)
    return jnp.zeros((1,) + tuple((k - 1) * d + 1 for k, d in zip(ks, dil)) + (in_features,), jnp.float32)


class WeightNormLinear(_WeightLayer):
    r"""Weight-normalized linear layer (Salimans & Kingma 2016) with ``flax.nnx.Linear``'s constructor.

    .. math:: y = x \cdot \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    Parameters ``v`` (in, out; ``kernel_init``, ``kernel_metadata``), ``g`` (out;
    ``scale_init``) and ``bias``; the arithmetic is :class:`normzoo.WeightNormDense`'s.
    (flax.nnx's ``WeightNorm`` wraps an existing layer instead; this is a layer of its own,
    like the linen one, and has no ``data_init``: NNX modules are built without data.)

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.WeightNormLinear(5, 4, rngs=nnx.Rngs(0))
      >>> layer(jax.random.normal(jax.random.key(1), (3, 5))).shape, layer.g[...].shape
      ((3, 4), (4,))
    """

    _linen = _weight.WeightNormDense
    _optional = ("bias",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = initializers.zeros_init(),
        dot_general: Any = jax.lax.dot_general,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_init: Any = initializers.ones_init(),
        epsilon: float = 1e-12,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG + ("kernel_metadata",)}
        self._configure(config, {"v": kernel_metadata, "bias": bias_metadata}, rngs, _linear_placeholder(in_features))


class CosineLinear(_WeightLayer):
    r"""Cosine-normalized linear layer (Luo et al. 2017) with ``flax.nnx.Linear``'s constructor.

    .. math:: y_j = s \frac{w_j \cdot x}{\lVert w_j \rVert \, \lVert x \rVert} + b_j

    ``use_bias`` defaults to False (as :class:`normzoo.CosineDense`); ``use_scale`` learns the
    scalar ``scale`` ``s``. The arithmetic is :class:`normzoo.CosineDense`'s.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> y = nznnx.CosineLinear(5, 4, rngs=nnx.Rngs(0))(jax.random.normal(jax.random.key(1), (3, 5)))
      >>> bool(jnp.all(jnp.abs(y) <= 1.0))
      True
    """

    _linen = _weight.CosineDense

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = initializers.zeros_init(),
        dot_general: Any = jax.lax.dot_general,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        use_scale: bool = False,
        scale_init: Any = initializers.ones_init(),
        epsilon: float = 1e-12,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG + ("kernel_metadata",)}
        self._configure(config, {"kernel": kernel_metadata, "bias": bias_metadata}, rngs,
                        _linear_placeholder(in_features))


class WeightNormConv(_WeightLayer):
    r"""Weight-normalized convolution (Salimans & Kingma 2016) with ``flax.nnx.Conv``'s constructor.

    .. math:: y = x * \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    Parameters ``v`` (*kernel_size, in / feature_group_count, out), ``g`` (out,), ``bias``;
    every ``flax.nnx.Conv`` argument with its meaning (padding modes, dilations, groups,
    mask). The arithmetic is :class:`normzoo.WeightNormConv`'s.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> conv = nznnx.WeightNormConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
      >>> conv(jax.random.normal(jax.random.key(1), (2, 8, 8, 3))).shape, conv.v[...].shape
      ((2, 8, 8, 4), (3, 3, 3, 4))
    """

    _linen = _weight.WeightNormConv
    _optional = ("bias",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Any,
        strides: Any = 1,
        *,
        padding: Any = "SAME",
        input_dilation: Any = 1,
        kernel_dilation: Any = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: Array | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = initializers.zeros_init(),
        conv_general_dilated: Any = jax.lax.conv_general_dilated,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_init: Any = initializers.ones_init(),
        epsilon: float = 1e-12,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG + ("kernel_metadata",)}
        self._configure(config, {"v": kernel_metadata, "bias": bias_metadata}, rngs,
                        _conv_placeholder(in_features, kernel_size, kernel_dilation))


class CosineConv(_WeightLayer):
    r"""Cosine-normalized convolution (Luo et al. 2017) with ``flax.nnx.Conv``'s constructor.

    .. math:: y_{p,j} = s \frac{w_j \cdot x_p}{\lVert w_j \rVert \, \lVert x_p \rVert} + b_j

    ``use_bias`` defaults to False; ``use_scale`` learns ``scale``. The arithmetic is
    :class:`normzoo.CosineConv`'s (patch norms by a box filter, never extracted patches).

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> conv = nznnx.CosineConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
      >>> conv(jax.random.normal(jax.random.key(1), (2, 6, 6, 3))).shape
      (2, 6, 6, 4)
    """

    _linen = _weight.CosineConv

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Any,
        strides: Any = 1,
        *,
        padding: Any = "SAME",
        input_dilation: Any = 1,
        kernel_dilation: Any = 1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        mask: Array | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = initializers.zeros_init(),
        conv_general_dilated: Any = jax.lax.conv_general_dilated,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        use_scale: bool = False,
        scale_init: Any = initializers.ones_init(),
        epsilon: float = 1e-12,
    ):
        config = {k: v for k, v in locals().items() if k not in _NOT_CONFIG + ("kernel_metadata",)}
        self._configure(config, {"kernel": kernel_metadata, "bias": bias_metadata}, rngs,
                        _conv_placeholder(in_features, kernel_size, kernel_dilation))


# ----------------------------------------------------------------------------- registry


class Identity(nnx.Module):
    """The normalizer of ``none``, ``weight`` and ``cosine``: returns ``x`` (cast to ``dtype`` if set).

    Built like the other normalizers (``num_features``, ``rngs``: both unused), so a model can
    build any of them from :func:`make` alike.
    """

    def __init__(self, num_features: int | None = None, *, dtype: Any = None, rngs: nnx.Rngs | None = None):
        self.dtype = dtype

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask=None) -> Array:
        """Returns ``x``."""
        return x if self.dtype is None else jnp.asarray(x, self.dtype)


_TWINS = {
    _batch.BatchNorm: BatchNorm, _batch.BatchRenorm: BatchRenorm, _batch.MeanOnlyBatchNorm: MeanOnlyBatchNorm,
    _batch.LpBatchNorm: LpBatchNorm, _batch.NoisyBatchNorm: NoisyBatchNorm,
    _sample.LayerNorm: LayerNorm, _sample.RMSNorm: RMSNorm, _sample.GroupNorm: GroupNorm,
    _sample.InstanceNorm: InstanceNorm, _composite.IBN: IBN, _registry.Identity: Identity,
    nn.Dense: nnx.Linear, nn.Conv: nnx.Conv, _weight.WeightNormDense: WeightNormLinear,
    _weight.WeightNormConv: WeightNormConv, _weight.CosineDense: CosineLinear, _weight.CosineConv: CosineConv,
}


def _keywords(cls) -> set[str]:
    if cls is Identity:
        return {"dtype"}
    # Everything but the required arguments (num_features, in/out_features, kernel_size) and rngs.
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.default is not inspect.Parameter.empty and p.name != "rngs"}


def _nnx_norm_factory(cls, overrides):
    def norm(num_features: int, train: bool, *, rngs: nnx.Rngs, **fields) -> nnx.Module:
        kw = {**overrides, **fields}
        if "use_running_average" in _keywords(cls):
            kw.setdefault("use_running_average", not train)
        return cls(num_features, **kw, rngs=rngs)

    norm.__doc__ = f"Returns a configured {cls.__name__}; ``train`` picks batch vs running statistics."
    return norm


_NNX = _registry._Api(layer=_TWINS.__getitem__, fields=_keywords, norm_factory=_nnx_norm_factory)


def make(name: str, **overrides: Any) -> _registry.Normalizer:
    """:func:`normzoo.make` for NNX models: the same names, rows and overrides, NNX layers.

    ``norm(num_features, train, rngs=...)`` builds the activation normalizer, ``dense(in, out,
    rngs=...)`` and ``conv(in, out, kernel_size, rngs=...)`` the linear layers
    (``nnx.Linear``/``nnx.Conv``, or the weight-normalized or cosine ones for ``weight`` and
    ``cosine``), so one config string switches the normalizer of an NNX model too.

    Example:
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> spec = nznnx.make("batch_renorm", r_max=2.0)
      >>> layer = spec.norm(16, train=False, rngs=nnx.Rngs(0))
      >>> type(layer).__name__, layer.use_running_average, layer.r_max
      ('BatchRenorm', True, 2.0)
      >>> type(nznnx.make("cosine").dense(8, 4, rngs=nnx.Rngs(0))).__name__
      'CosineLinear'

    Raises:
      ValueError: unknown name (the message lists the known ones).
      TypeError: an override that the configured layer does not take.
    """
    return _registry._make(name, overrides, _NNX)


# ----------------------------------------------------------------------------- checkpoints


def to_linen(module: nnx.Module) -> dict:
    """The module's variables as a linen variable dict: ``{"params": ..., "batch_stats": ...}``,
    nested by the module's attribute paths (which are the linen layer's variable names and, in
    a model whose submodules are named as the linen model's, its paths).

    Example:
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> import normzoo, jax.numpy as jnp
      >>> variables = nznnx.to_linen(nznnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> y = normzoo.BatchNorm(use_running_average=True).apply(variables, jnp.ones((2, 3)))
      >>> sorted(variables), sorted(variables['batch_stats'])
      (['batch_stats', 'params'], ['mean', 'var'])
    """
    out: dict = {}
    for path, variable in nnx.to_flat_state(nnx.state(module, (nnx.Param, nnx.BatchStat))):
        collection = "params" if isinstance(variable, nnx.Param) else "batch_stats"
        node = out.setdefault(collection, {})
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = variable[...]
    return out


def from_linen(module: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Loads linen ``variables`` (``params`` and ``batch_stats``) into ``module`` in place.

    Every Param and BatchStat of the module must be given, with its shape, and nothing else:
    a missing, extra or mis-shaped entry raises ``ValueError`` naming its path, so nothing
    is silently dropped or left at its initial value.
    """
    variables = nn.meta.unbox(variables)  # partitioned (nn.with_partitioning) checkpoints load as values
    given = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables.get(collection, {})))[0]:
            given[(collection,) + tuple(k.key for k in path)] = leaf
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
        raise ValueError(f"from_linen: collections {unknown} have no nnx counterpart here; "
                         "give only 'params' and 'batch_stats'.")
    expected = {}
    for path, variable in nnx.to_flat_state(nnx.state(module, (nnx.Param, nnx.BatchStat))):
        collection = "params" if isinstance(variable, nnx.Param) else "batch_stats"
        expected[(collection,) + tuple(str(k) for k in path)] = variable
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(
            f"from_linen: the variables do not match the module: missing {['/'.join(p) for p in missing]}, "
            f"unexpected {['/'.join(p) for p in extra]}; build the nnx model with the linen model's "
            "layer names and options."
        )
    for key, variable in expected.items():  # every shape checked before anything is written
        if tuple(jnp.shape(given[key])) != variable[...].shape:
            raise ValueError(
                f"from_linen: {'/'.join(key)} has shape {tuple(jnp.shape(given[key]))} but the module's has "
                f"{tuple(variable[...].shape)}."
            )
    for key, variable in expected.items():
        variable[...] = jnp.asarray(given[key]).astype(variable[...].dtype)
