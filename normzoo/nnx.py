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
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _flax_dtypes
from flax.nnx.nn import initializers

from normzoo import _batch, _sample
from normzoo._stats import AffineMap

Array = jax.Array

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "MeanOnlyBatchNorm", "RMSNorm"]


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
        if name in self._fields:
            return getattr(self._module, name)
        method = getattr(type(self._module)._linen, name)  # a helper of the linen layer
        return method.__get__(self)

    def is_initializing(self) -> bool:
        return self._creating is not None

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
    rank = max([2] + [a + 1 if a >= 0 else -a for a in feature_axes + other_axes])
    shape = [1] * rank
    shape[0] = batch
    for a, n in zip(feature_axes, feature_shape):
        shape[a] = n
    return jnp.zeros(shape, jnp.float32)


class _Layer(nnx.Module):
    """The shell: configuration and variables here, the maths in ``_linen``'s ``_map``."""

    _linen: type  # the linen layer whose code runs

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
        self._run(placeholder, creating=_Creating(rngs, metadata))
        for name in ("scale", "bias"):  # as flax.nnx: None where the parameter is not used
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
        scope = self._scope(creating, {"use_running_average": None, "force_float32_reductions": True})
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
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        return self._run(x, mask=mask, use_running_average=use_ra)(x)

    def set_view(self, use_running_average: bool | None = None):
        """For ``nnx.view``: sets ``use_running_average``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
