"""normzoo's layers as ``flax.nnx`` modules: ``from normzoo import nnx as nznnx``.

Each class here is a drop-in for its ``flax.nnx`` counterpart (where flax has one): the same
constructor, ``num_features`` first and then flax's keyword arguments in flax's order with
flax's defaults, ``rngs``, and the same variables (``nnx.Param`` ``scale``/``bias``,
``nnx.BatchStat`` ``mean``/``var``), so ``nnx.state`` of a flax.nnx model loads into the
normzoo one and back. ``model.train()`` / ``model.eval()`` / ``nnx.view`` and
``use_running_average`` at call time work as in flax.nnx (the call's value wins).
normzoo's own options (``virtual_batch_size``, BatchRenorm's bounds, ...) follow flax's
arguments, keyword-only, with the linen layer's defaults.

Like flax.nnx's, each class creates its variables in ``__init__``, keeps the configuration
flax.nnx keeps as attributes (not the initializers: the graph does not depend on how a layer
was initialized), and its ``__call__`` promotes dtypes with ``promote_dtype`` (flax's meaning:
it decides the dtypes of the input and the variables; the statistics stay in at least
float32), calls the layer's function in :mod:`normzoo.functional` and writes the new running
statistics back. The linen layers call the same functions.

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

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx
from flax.nnx.nn import dtypes as _flax_dtypes
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init

from normzoo import _registry, _stats, _weight
from normzoo import functional as F
from normzoo._stats import AffineMap

Array = jax.Array

__all__ = ["BatchNorm", "BatchNormFreeze", "BatchRenorm", "CosineConv", "CosineLinear", "EvoNormB0", "EvoNormS0",
           "FilterResponseNorm", "FrozenBatchNorm", "GlobalResponseNorm", "GroupNorm",
           "IBN", "Identity", "InstanceNorm", "IterNorm", "ScaledStdConv", "ScaledStdLinear", "SpectralNorm", "StdConv", "StdLinear",
           "WeightNorm", "freeze_batch_norm",
           "LayerNorm", "LpBatchNorm", "MeanOnlyBatchNorm", "NoisyBatchNorm", "RMSNorm", "WeightNormConv", "WeightNormLinear", "from_linen",
           "make", "to_linen"]


# ----------------------------------------------------------------------------- shared pieces


def _shape(num_features: int | Sequence[int], axes: Any, layer: str) -> tuple[int, ...]:
    """The variables' shape: ``(num_features,)``, or one size per feature axis."""
    shape = ((int(num_features),) if isinstance(num_features, numbers.Integral)
             else tuple(cast(Sequence[int], num_features)))
    n_axes = 1 if isinstance(axes, numbers.Integral) else len(tuple(axes))
    if len(shape) != n_axes:
        raise ValueError(
            f"{layer}: num_features={num_features!r} must give one size per feature axis ({axes!r}); "
            "pass an int for a single feature axis or a tuple of sizes."
        )
    return shape


def _param(use: bool, init: Any, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, metadata: Mapping[str, Any]):
    """An ``nnx.Param`` drawn with the next ``params`` key, or ``nnx.data(None)`` where unused (flax.nnx's)."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata)


def _scale(use: bool, init: Any, plus_one: bool, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any,
           metadata: Mapping[str, Any]):
    """``scale`` (:func:`_param`) and the ``scale_plus_one`` setting: with it the parameter is the
    offset ``gamma - 1``, initialized at 0 where ``init`` is left at its default (ones)."""
    init = initializers.zeros_init() if plus_one and init is initializers.ones_init() else init
    return _param(use, init, rngs, shape, dtype, metadata), plus_one


def _plus_one(scale: Array | None, plus_one: bool) -> Array | None:
    """The scale that multiplies: ``1 + scale`` for a layer with ``scale_plus_one``."""
    return 1 + scale if plus_one and scale is not None else scale


def _value(variable: nnx.Variable | None) -> Array | None:
    return None if variable is None else variable[...]


def _first_from(call: bool | None, attribute: bool | None, layer: str) -> bool:
    # flax.nnx's rule: the call's value wins over the attribute; one of them is required.
    value = call if call is not None else attribute
    if value is None:
        raise ValueError(
            f"{layer}: no use_running_average given; pass it to the constructor, to the call, "
            f"or set it with model.train() / model.eval() / nnx.view(model, use_running_average=...)."
        )
    return value


class _RunningAverage(nnx.Module):
    """``use_running_average`` as flax.nnx.BatchNorm has it: an attribute that ``model.train()``,
    ``model.eval()`` and ``nnx.view`` set, and a call argument that wins."""

    if TYPE_CHECKING:
        use_running_average: bool | None

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``.

        Args:
          use_running_average: if True, the stored running statistics are used instead of
            computing the batch statistics on the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


# ----------------------------------------------------------------------------- batch family


class _BatchNorm(_RunningAverage):
    """The shell of the batch family: ``__call__`` applies ``_map``'s output map to ``x``;
    ``affine_map`` returns it (IBN and deployment code join and fold maps)."""

    if TYPE_CHECKING:  # what each layer's __init__ sets, for the type checker
        mean: nnx.BatchStat
        scale: Any
        scale_plus_one: bool
        bias: Any
        dtype: Any
        promote_dtype: Any
        _map: Callable[..., tuple[AffineMap, Array]]

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``: with batch statistics (running ones updated) or, if
        ``use_running_average`` (the call's value, else the attribute), the running ones.

        Args:
          x: the input to be normalized.
          use_running_average: if True, the stored running statistics are used instead of
            the batch's; takes precedence over the attribute.
          mask: boolean, broadcastable to ``x``: the elements that enter the statistics.

        Returns:
          Normalized inputs (the same shape as inputs).
        """
        amap, x = self._map(x, use_running_average, mask)
        return amap(x)

    def affine_map(self, x: Array, use_running_average: bool | None = None, *,
                   mask: Array | None = None) -> AffineMap:
        """The map ``y = (x - mean) * mul + add`` that ``__call__`` applies (same arguments and updates)."""
        return self._map(x, use_running_average, mask)[0]

    def _inputs(self, x: Array, use_running_average: bool | None):
        """``(training, x, (mean, var), scale, bias)`` after ``promote_dtype``, as flax.nnx.BatchNorm
        promotes them: the running statistics a training call updates are the stored ones; the ones
        an inference call normalizes by are the promoted ones."""
        training = not _first_from(use_running_average, self.use_running_average, type(self).__name__)
        stored = (_value(self.mean), _value(getattr(self, "var", None)))
        x, mean, var, scale, bias = self.promote_dtype(
            (x, *stored, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return training, x, stored if training else (mean, var), _plus_one(scale, self.scale_plus_one), bias

    def _options(self, mask: Array | None) -> dict[str, Any]:
        return dict(momentum=self.momentum, epsilon=self.epsilon, axis=self.axis, mask=mask,
                    axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                    virtual_batch_size=self.virtual_batch_size, dtype=self.dtype, layer=type(self).__name__)

    def _store(self, training: bool, new: Mapping[str, Array | None]) -> None:
        if training:
            for name, value in new.items():
                if value is not None:
                    getattr(self, name)[...] = value

    def _configure(self, num_features, use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
                   use_scale, axis_name, axis_index_groups, use_fast_variance, promote_dtype, virtual_batch_size):
        # What flax.nnx.BatchNorm keeps (not the initializers), then normzoo's option.
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.virtual_batch_size = virtual_batch_size


class BatchNorm(_BatchNorm):
    r"""Batch normalization as an ``nnx.Module``; drop-in for ``flax.nnx.BatchNorm``.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    with the batch's mean and (biased) variance over every axis but ``axis`` in training,
    the running ones (``r = momentum * r + (1 - momentum) * b``) with
    ``use_running_average``. The arithmetic is :func:`normzoo.functional.batch_norm` (stable
    variance in at least float32, one-collective count-weighted sync with ``axis_name``, masks,
    ghost batches); :class:`normzoo.BatchNorm` lists the differences from flax.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> bn = nznnx.BatchNorm(4, rngs=nnx.Rngs(0))
      >>> y = bn(jax.random.normal(jax.random.key(0), (16, 4)))
      >>> sorted(nnx.state(bn, nnx.BatchStat))
      ['mean', 'var']

    ``use_running_average``, ``axis``, ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``,
    ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
    ``axis_index_groups``, ``use_fast_variance``, ``promote_dtype``, ``rngs``,
    ``bias_metadata`` and ``scale_metadata`` are ``flax.nnx.BatchNorm``'s, with their meaning
    (``use_fast_variance`` has no effect: the variance is always stable).

    Args:
      num_features: the number of channels (the size of ``axis``; a tuple of sizes for a
        tuple of axes).
      virtual_batch_size: (normzoo) ghost batch size, as :class:`normzoo.BatchNorm`.
      scale_plus_one: (normzoo) the scale stored as an offset from 1, as
        :class:`normzoo.BatchNorm` (every layer here with a ``scale`` has it).
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
        scale_plus_one: bool = False,
    ):
        shape = _shape(num_features, axis, "BatchNorm")
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
                        use_scale, axis_name, axis_index_groups, use_fast_variance, promote_dtype, virtual_batch_size)

    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> tuple[AffineMap, Array]:
        training, x, (mean, var), scale, bias = self._inputs(x, use_running_average)
        amap, new = F._batch_map(x, mean, var, scale, bias, training=training, **self._options(mask))
        self._store(training, new._asdict())
        return amap, x


class FrozenBatchNorm(_BatchNorm):
    r"""Frozen batch normalization as an ``nnx.Module``: :class:`normzoo.FrozenBatchNorm`'s twin.

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with the stored statistics whatever the mode, nothing updated and no gradient to the
    statistics or the affine parameters. Constructor and variables are :class:`BatchNorm`'s
    (a BatchNorm's state loads unchanged); ``use_running_average``, ``momentum``,
    ``axis_name`` and ``axis_index_groups`` are accepted and have no effect. The arithmetic is
    :func:`normzoo.functional.frozen_batch_norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> bn = nznnx.FrozenBatchNorm(2, rngs=nnx.Rngs(0))
      >>> bn.mean[...] = jnp.array([1.0, 2.0])
      >>> bn(jnp.array([[1.0, 3.0]])).round(3).tolist(), bn.mean[...].tolist()
      ([[0.0, 1.0]], [1.0, 2.0])

    Args: as :class:`BatchNorm` (no ``virtual_batch_size``).
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
        scale_plus_one: bool = False,
    ):
        shape = _shape(num_features, axis, "FrozenBatchNorm")
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
                        use_scale, axis_name, axis_index_groups, use_fast_variance, promote_dtype, None)

    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> tuple[AffineMap, Array]:
        x, mean, var, scale, bias = self.promote_dtype(
            (x, _value(self.mean), _value(self.var), _value(self.scale), _value(self.bias)), dtype=self.dtype)
        amap = F._frozen_map(x, mean, var, _plus_one(scale, self.scale_plus_one), bias, epsilon=self.epsilon,
                             axis=self.axis, dtype=self.dtype, layer=type(self).__name__)
        return amap, x


class BatchRenorm(_BatchNorm):
    r"""Batch renormalization (Ioffe 2017) as an ``nnx.Module`` (flax.nnx has none).

    .. math:: y = \gamma \Big(\frac{x - \mu_B}{\sigma_B} r + d\Big) + \beta

    with ``r`` and ``d`` clipped to ``[1/r_max, r_max]`` and ``[-d_max, d_max]`` and relaxed
    from (1, 0) over ``warmup_steps`` (counted in the ``steps`` BatchStat); the arithmetic is
    :func:`normzoo.functional.batch_renorm`, and :class:`normzoo.BatchRenorm` documents every
    field. Arguments: those of :class:`BatchNorm`, then ``r_max``, ``d_max``, ``warmup_steps``,
    ``warmup_schedule``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.BatchRenorm(8, warmup_steps=100, rngs=nnx.Rngs(0))
      >>> _ = layer(jax.random.normal(jax.random.key(0), (4, 8)))
      >>> int(layer.steps[...])
      1
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
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        warmup_schedule: str = "linear",
        scale_plus_one: bool = False,
    ):
        F._check_renorm(r_max, d_max, warmup_steps, warmup_schedule, "BatchRenorm")
        shape = _shape(num_features, axis, "BatchRenorm")
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
                        use_scale, axis_name, axis_index_groups, use_fast_variance, promote_dtype, virtual_batch_size)
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.warmup_schedule = warmup_schedule

    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> tuple[AffineMap, Array]:
        training, x, (mean, var), scale, bias = self._inputs(x, use_running_average)
        amap, new = F._renorm_map(
            x, mean, var, self.steps[...], scale, bias, training=training, r_max=self.r_max, d_max=self.d_max,
            warmup_steps=self.warmup_steps, warmup_schedule=self.warmup_schedule, **self._options(mask))
        self._store(training, new._asdict())
        return amap, x


class MeanOnlyBatchNorm(_BatchNorm):
    r"""Mean-only batch normalization (Salimans & Kingma 2016) as an ``nnx.Module``.

    .. math:: y = x - \mu_B + \beta

    Arguments as :class:`BatchNorm` (``use_scale`` defaults to False); only the ``mean``
    BatchStat is kept. The arithmetic is :func:`normzoo.functional.mean_only_batch_norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> nznnx.MeanOnlyBatchNorm(2, rngs=nnx.Rngs(0))(jnp.arange(6.0).reshape(3, 2)).tolist()
      [[-2.0, -2.0], [0.0, 0.0], [2.0, 2.0]]
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
        scale_plus_one: bool = False,
    ):
        shape = _shape(num_features, axis, "MeanOnlyBatchNorm")
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
                        use_scale, axis_name, axis_index_groups, use_fast_variance, promote_dtype, virtual_batch_size)

    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> tuple[AffineMap, Array]:
        training, x, (mean, _), scale, bias = self._inputs(x, use_running_average)
        amap, new = F._batch_map(x, mean, None, scale, bias, training=training, divide=False, **self._options(mask))
        self._store(training, {"mean": new.mean})
        return amap, x


class LpBatchNorm(_BatchNorm):
    r"""Batch normalization by the batch's L1, L2 or L∞ deviation (Santurkar et al. 2018) as an ``nnx.Module``.

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{s_p^2 + \epsilon}} + \beta

    with ``s_1 = sqrt(pi/2) E|x - mu_B|``, ``s_2`` the standard deviation, ``s_inf = max |x - mu_B|``;
    the arithmetic, running statistics (``mean``, ``var = s_p^2``) and sync are
    :func:`normzoo.functional.lp_batch_norm`'s. Arguments: those of :class:`BatchNorm`, then ``p``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.LpBatchNorm(3, p=1, rngs=nnx.Rngs(0))
      >>> layer(jax.random.normal(jax.random.key(0), (64, 3))).shape
      (64, 3)
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
        p: float | str = 2,
        scale_plus_one: bool = False,
    ):
        F._lp_order(p, "LpBatchNorm")
        shape = _shape(num_features, axis, "LpBatchNorm")
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
                        use_scale, axis_name, axis_index_groups, use_fast_variance, promote_dtype, virtual_batch_size)
        self.p = p

    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> tuple[AffineMap, Array]:
        training, x, (mean, var), scale, bias = self._inputs(x, use_running_average)
        amap, new = F._lp_map(x, mean, var, scale, bias, p=self.p, training=training, **self._options(mask))
        self._store(training, new._asdict())
        return amap, x


class NoisyBatchNorm(_BatchNorm):
    r"""BatchNorm followed by per-activation noise whose distribution changes every step
    (Santurkar et al. 2018's "noisy" BatchNorm) as an ``nnx.Module``.

    .. math:: y_{ij} = s_{ij}\, \mathrm{BN}(x)_{ij} + m_{ij}, \quad s_{ij} \sim \mathcal{N}(\sigma_j, w^2),
        \ m_{ij} \sim U(\mu_j - w, \mu_j + w)

    with ``mu_j``, ``sigma_j`` drawn per feature at every call; :func:`normzoo.functional.noisy_batch_norm`
    is the arithmetic and :class:`normzoo.NoisyBatchNorm` documents every field. Arguments:
    those of :class:`BatchNorm`, then ``shift_range``, ``scale_range``, ``noise_width``,
    ``rng_collection``. The keys come from the stream ``rngs[rng_collection]`` given at
    construction (forked, as ``nnx.Dropout`` does; without such a stream, ``rngs``' default
    one); no noise with ``use_running_average``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.NoisyBatchNorm(4, rngs=nnx.Rngs(params=0, noise=1))
      >>> y1, y2 = (layer(jax.random.normal(jax.random.key(0), (8, 4))) for _ in range(2))
      >>> bool((y1 != y2).any())  # new noise at every call
      True
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
        shift_range: float = 0.5,
        scale_range: tuple[float, float] = (1.0, 1.25),
        noise_width: float = 0.1,
        rng_collection: str = "noise",
        scale_plus_one: bool = False,
    ):
        F._check_noise(shift_range, scale_range, noise_width, "NoisyBatchNorm")
        shape = _shape(num_features, axis, "NoisyBatchNorm")
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias,
                        use_scale, axis_name, axis_index_groups, use_fast_variance, promote_dtype, virtual_batch_size)
        self.shift_range = shift_range
        self.scale_range = tuple(scale_range)
        self.noise_width = noise_width
        self.rng_collection = rng_collection
        self.rngs = rngs[rng_collection].fork()

    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> tuple[AffineMap, Array]:
        training, x, (mean, var), scale, bias = self._inputs(x, use_running_average)
        amap, new = F._noisy_map(
            x, mean, var, scale, bias, key=self.rngs() if training else None, training=training,
            shift_range=self.shift_range, scale_range=self.scale_range, noise_width=self.noise_width,
            **self._options(mask))
        self._store(training, new._asdict())
        return amap, x


# ----------------------------------------------------------------------------- per-sample family


class _PerSample(nnx.Module):
    """The per-sample shells: scale and bias promoted with ``x`` (flax.nnx's), then the function."""

    if TYPE_CHECKING:  # what each layer's __init__ sets, for the type checker
        scale: Any
        scale_plus_one: bool
        bias: Any
        dtype: Any
        promote_dtype: Any
        epsilon: float
        axis_name: str | None
        axis_index_groups: Any

    def _promoted(self, x: Array) -> tuple[Array, Array | None, Array | None]:
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return x, _plus_one(scale, self.scale_plus_one), bias

    def _options(self, mask: Array | None) -> dict[str, Any]:
        return dict(epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                    axis_index_groups=self.axis_index_groups, dtype=self.dtype, layer=type(self).__name__)

    def _configure(self, num_features, epsilon, dtype, param_dtype, use_bias, use_scale, axis_name,
                   axis_index_groups, use_fast_variance, promote_dtype):
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype


class LayerNorm(_PerSample):
    r"""Layer normalization as an ``nnx.Module``; drop-in for ``flax.nnx.LayerNorm``.

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    over ``reduction_axes`` per example; the arithmetic is :func:`normzoo.functional.layer_norm`.

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
        scale_plus_one: bool = False,
    ):
        shape = _shape(num_features, feature_axes, "LayerNorm")
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, epsilon, dtype, param_dtype, use_bias, use_scale, axis_name,
                        axis_index_groups, use_fast_variance, promote_dtype)
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; ``mask`` (boolean, broadcastable) selects what enters the statistics."""
        x, scale, bias = self._promoted(x)
        layer = type(self).__name__
        reduction_axes = _stats.canonicalize_axes(x.ndim, self.reduction_axes, argument="reduction_axes", layer=layer)
        feature_axes = _stats.canonicalize_axes(x.ndim, self.feature_axes, argument="feature_axes", layer=layer)
        return F._sample_map(x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
                             use_mean=True, **self._options(mask))(x)


class RMSNorm(_PerSample):
    r"""Root-mean-square normalization as an ``nnx.Module``; drop-in for ``flax.nnx.RMSNorm``.

    .. math:: y = \gamma \frac{x}{\sqrt{\mathrm{E}[|x|^2] + \epsilon}}

    The arithmetic is :func:`normzoo.functional.rms_norm`. Arguments: ``flax.nnx.RMSNorm``'s,
    then normzoo's ``use_bias`` (default False), ``bias_init`` and ``bias_metadata``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> y = nznnx.RMSNorm(2, rngs=nnx.Rngs(0))(jnp.array([[3.0, 4.0]]))
      >>> [round(float(v), 3) for v in (y * jnp.sqrt(12.5))[0]]
      [3.0, 4.0]
    """

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
        scale_plus_one: bool = False,
    ):
        shape = _shape(num_features, feature_axes, "RMSNorm")
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, epsilon, dtype, param_dtype, use_bias, use_scale, axis_name,
                        axis_index_groups, use_fast_variance, promote_dtype)
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalizes ``x``; ``mask`` (boolean, broadcastable; positional, as in flax.nnx.RMSNorm)
        selects what enters the statistics."""
        if self.use_bias:
            x, scale, bias = self._promoted(x)
        else:  # flax.nnx.RMSNorm promotes (x, scale): a custom promote_dtype sees its tuple
            (x, scale), bias = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype), None
            scale = _plus_one(scale, self.scale_plus_one)
        layer = type(self).__name__
        reduction_axes = _stats.canonicalize_axes(x.ndim, self.reduction_axes, argument="reduction_axes", layer=layer)
        feature_axes = _stats.canonicalize_axes(x.ndim, self.feature_axes, argument="feature_axes", layer=layer)
        return F._sample_map(x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
                             use_mean=False, **self._options(mask))(x)


class GroupNorm(_PerSample):
    r"""Group normalization as an ``nnx.Module``; drop-in for ``flax.nnx.GroupNorm``.

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} + \beta_c

    The channels (last axis) form ``num_groups`` groups (or groups of ``group_size``),
    checked against ``num_features`` here, as flax.nnx does; the arithmetic is
    :func:`normzoo.functional.group_norm`.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> gn = nznnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))
      >>> gn(jax.random.normal(jax.random.key(0), (2, 4, 4, 8))).shape, gn.group_size
      ((2, 4, 4, 8), 4)
    """

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
        scale_plus_one: bool = False,
    ):
        # As flax.nnx: both counts kept, computed and checked here.
        self.feature_axis = -1
        self.num_groups = F._groups(num_features, num_groups, group_size, "GroupNorm")
        self.group_size = num_features // self.num_groups
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, (num_features,), param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, (num_features,), param_dtype, bias_metadata)
        self._configure(num_features, epsilon, dtype, param_dtype, use_bias, use_scale, axis_name,
                        axis_index_groups, use_fast_variance, promote_dtype)
        self.reduction_axes = reduction_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` per example and channel group."""
        x, scale, bias = self._promoted(x)
        return F._group_map(x, scale, bias, num_groups=self.num_groups, group_size=None,
                            reduction_axes=self.reduction_axes, **self._options(mask))(x)


class InstanceNorm(_PerSample, _RunningAverage):
    r"""Instance normalization as an ``nnx.Module``; drop-in for ``flax.nnx.InstanceNorm``.

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

    The arithmetic is :func:`normzoo.functional.instance_norm` (with ``track_running_stats``,
    :func:`normzoo.functional.tracked_instance_norm`). Arguments: ``flax.nnx.InstanceNorm``'s,
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
        scale_plus_one: bool = False,
    ):
        shape = _shape(num_features, feature_axes, "InstanceNorm")
        if track_running_stats:
            self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
            self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype,
                                                 scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        self._configure(num_features, epsilon, dtype, param_dtype, use_bias, use_scale, axis_name,
                        axis_index_groups, use_fast_variance, promote_dtype)
        self.feature_axes = feature_axes
        self.track_running_stats = track_running_stats
        self.use_running_average = use_running_average
        self.momentum = momentum

    def __call__(self, x: Array, *, mask: Array | None = None, use_running_average: bool | None = None) -> Array:
        """Normalizes ``x`` per example and channel (with ``track_running_stats``,
        ``use_running_average`` selects the running statistics, as in BatchNorm)."""
        amap, x = self._map(x, mask, use_running_average)
        return amap(x)

    def _map(self, x: Array, mask: Array | None, use_running_average: bool | None = None) -> tuple[AffineMap, Array]:
        training, stored = True, cast(tuple[Array | None, Array | None], (None, None))
        if self.track_running_stats:  # without tracked statistics the attribute is never read
            training = not _first_from(use_running_average, self.use_running_average, type(self).__name__)
            stored = (self.mean[...], self.var[...])
        x, scale, bias = self._promoted(x)
        amap, new = F._instance_map(x, scale, bias, *stored, training=training, momentum=self.momentum,
                                    feature_axes=self.feature_axes, **self._options(mask))
        if self.track_running_stats and training:
            self.mean[...], self.var[...] = new
        return amap, x


class IBN(nnx.Module):
    r"""Instance-Batch Normalization, IBN-a (Pan et al. 2018), as an ``nnx.Module``.

    .. math:: y = \mathrm{concat}\big(\mathrm{IN}(x_{[:k]}),\ \mathrm{BN}(x_{[k:]})\big),\quad k = \lfloor C \cdot \mathrm{ratio} \rfloor

    Submodules ``IN`` (:class:`InstanceNorm` over ``k`` channels; None if ``k = 0``) and
    ``BN`` (:class:`BatchNorm` over the rest; None if none are left), named as the linen
    :class:`normzoo.IBN`'s; their maps are joined and applied in one pass, as
    :func:`normzoo.functional.ibn` does. Arguments: :class:`BatchNorm`'s, then ``ratio``.

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
        scale_plus_one: bool = False,
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
                      scale_metadata=scale_metadata, scale_plus_one=scale_plus_one)
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
        return self._map(x, use_running_average, mask)(x)

    def affine_map(self, x: Array, use_running_average: bool | None = None, *,
                   mask: Array | None = None) -> AffineMap:
        """The joined map ``__call__`` applies (same arguments; updates BN's running statistics)."""
        return self._map(x, use_running_average, mask)

    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        def instance(part, mask, axis):  # called only where the instance part has channels
            assert self.IN is not None
            return self.IN._map(part, mask)[0]

        def batch(part, mask):  # called only where the batch part has channels
            assert self.BN is not None
            return self.BN._map(part, use_running_average, mask)[0]

        return F._ibn_map(x, mask, self.ratio, self.axis, instance, batch)


# ----------------------------------------------------------------------------- weight family


class _WeightLayer(nnx.Module):
    """Linear layers with a normalized kernel, with flax.nnx.Linear's / Conv's constructor and
    attributes; ``promote_dtype`` as flax.nnx (it sees ``(inputs, kernel, bias)``)."""

    if TYPE_CHECKING:  # what _configure sets from the constructor's arguments, for the type checker
        in_features: int
        out_features: int
        kernel_size: Sequence[int]
        kernel_shape: tuple[int, ...]
        strides: Any
        padding: Any
        input_dilation: Any
        kernel_dilation: Any
        feature_group_count: int
        mask: Any
        precision: Any
        dot_general: Any
        conv_general_dilated: Any
        dtype: Any
        promote_dtype: Any
        epsilon: float
        kernel: nnx.Param
        v: nnx.Param
        g: nnx.Param
        scale: Any
        bias: Any

        def _apply(self, op: Callable, x: Array, sumsq: Callable) -> Array: ...

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Applies the layer to ``inputs`` (features last). ``out_sharding`` (flax.nnx's explicit-
        sharding output spec) is not supported: leave it None."""
        if out_sharding is not None:
            raise ValueError(
                f"{type(self).__name__}: out_sharding={out_sharding!r} is not supported; leave it None "
                "and shard the result with jax.sharding.reshard if needed."
            )
        op, restore, x, sumsq = self._geometry(inputs)
        return restore(self._apply(op, x, sumsq))

    def _geometry(self, x: Array):
        """``(op, restore, x, sumsq)``: ``op(x, kernel)`` the layer's linear map on the prepared
        input, ``sumsq`` the squared norms of each output's input patch (CosineNorm)."""
        if hasattr(self, "kernel_size"):
            geometry = F._conv_geometry(
                x, self.out_features, self.kernel_size, strides=self.strides, padding=self.padding,
                input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
                feature_group_count=self.feature_group_count, mask=self.mask, precision=self.precision,
                layer=type(self).__name__)
            shape, restore, x = geometry.kernel_shape, geometry.restore, geometry.x
            op = lambda a, k: F._convolve(geometry, a, k, self.conv_general_dilated)  # noqa: E731
            sumsq = lambda a, kernel_shape: F._patch_sumsq(  # noqa: E731
                geometry, a, kernel_shape, self.mask, self.feature_group_count)
        else:
            if x.ndim < 1:
                raise ValueError(f"{type(self).__name__}: expected an input of rank >= 1 (features last), got a scalar.")
            shape = (x.shape[-1], self.out_features)
            op = lambda a, k: F._dense(a, k, self.precision, self.dot_general)  # noqa: E731
            restore = lambda y: y  # noqa: E731
            sumsq = lambda a, kernel_shape: jnp.sum(_stats.abs_sq(a), -1, keepdims=True)  # noqa: E731
        if shape != self.kernel_shape:
            raise ValueError(
                f"{type(self).__name__}: the input of shape {tuple(x.shape)} needs a kernel of shape {shape}, "
                f"but this layer's is {self.kernel_shape} (in_features={self.in_features})."
            )
        return op, restore, x, sumsq

    def _configure(self, config: dict, rngs: nnx.Rngs, kernel_name: str, kernel_init, kernel_metadata,
                   bias_init, bias_metadata, scale_init) -> None:
        layer = type(self).__name__
        if config.pop("preferred_element_type", None) is not None:
            raise ValueError(
                f"{layer}: preferred_element_type is not supported; the normalized "
                "product is accumulated in at least float32 and returned in `dtype`."
            )
        in_features, out_features = config["in_features"], config["out_features"]
        if "kernel_size" in config:
            ks = config["kernel_size"]
            ks = (ks,) if isinstance(ks, numbers.Integral) else tuple(ks)
            groups = config["feature_group_count"]
            if in_features % groups or out_features % groups:
                raise ValueError(f"{layer}: feature_group_count={groups} must divide the {in_features} input "
                                 f"and {out_features} output features.")
            self.kernel_shape = ks + (in_features // groups, out_features)
            config["mask"] = nnx.data(config["mask"]) if config["mask"] is not None else None
        else:
            self.kernel_shape = (in_features, out_features)
        dtype = config["param_dtype"]
        setattr(self, kernel_name, nnx.Param(kernel_init(rngs.params(), self.kernel_shape, dtype), **kernel_metadata))
        if kernel_name == "v":  # WeightNorm: g = ||v|| direction scale
            self.g = nnx.Param(scale_init(rngs.params(), (out_features,), dtype))
        elif config.get("use_scale"):  # CosineNorm: a scalar output scale
            self.scale = nnx.Param(scale_init(rngs.params(), (), dtype))
        else:
            self.scale = nnx.data(None)
        self.bias = _param(config["use_bias"], bias_init, rngs, (out_features,), dtype, bias_metadata)
        for name, value in config.items():
            setattr(self, name, value)


class _WeightNorm(_WeightLayer):
    def _apply(self, op, x: Array, sumsq) -> Array:
        kernel = F.weight_norm(self.v[...], self.g[...], epsilon=self.epsilon, mask=getattr(self, "mask", None),
                               dtype=self.dtype)
        x, kernel, bias = self.promote_dtype((x, kernel, _value(self.bias)), dtype=self.dtype)
        return F._add_bias(op(x, kernel), bias)


class _Cosine(_WeightLayer):
    def _apply(self, op, x: Array, sumsq) -> Array:
        kernel = self.kernel[...]
        if getattr(self, "mask", None) is not None:
            kernel = kernel * self.mask
        x, kernel = self.promote_dtype((x, kernel), dtype=self.dtype)
        return F._cosine(x, kernel, _value(self.scale), _value(self.bias), self.epsilon, op, sumsq, self.dtype,
                         promote=False)


def _config(local: dict) -> dict:
    """A constructor's arguments that become attributes (flax.nnx keeps no initializers, rngs or
    metadata)."""
    skip = {"self", "rngs", "kernel_init", "bias_init", "scale_init", "kernel_metadata", "bias_metadata", "__class__"}
    return {k: v for k, v in local.items() if k not in skip}


class WeightNormLinear(_WeightNorm):
    r"""Weight-normalized linear layer (Salimans & Kingma 2016) with ``flax.nnx.Linear``'s constructor.

    .. math:: y = x \cdot \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    Parameters ``v`` (in, out; ``kernel_init``, ``kernel_metadata``), ``g`` (out;
    ``scale_init``) and ``bias``; the arithmetic is :func:`normzoo.functional.weight_norm`.
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
        self._configure(_config(locals()), rngs, "v", kernel_init, kernel_metadata, bias_init, bias_metadata, scale_init)


class CosineLinear(_Cosine):
    r"""Cosine-normalized linear layer (Luo et al. 2017) with ``flax.nnx.Linear``'s constructor.

    .. math:: y_j = s \frac{w_j \cdot x}{\lVert w_j \rVert \, \lVert x \rVert} + b_j

    ``use_bias`` defaults to False (as :class:`normzoo.CosineDense`); ``use_scale`` learns the
    scalar ``scale`` ``s``. The arithmetic is :func:`normzoo.functional.cosine_dense`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> y = nznnx.CosineLinear(5, 4, rngs=nnx.Rngs(0))(jax.random.normal(jax.random.key(1), (3, 5)))
      >>> bool(jnp.all(jnp.abs(y) <= 1.0))
      True
    """

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
        self._configure(_config(locals()), rngs, "kernel", kernel_init, kernel_metadata, bias_init, bias_metadata,
                        scale_init)


class WeightNormConv(_WeightNorm):
    r"""Weight-normalized convolution (Salimans & Kingma 2016) with ``flax.nnx.Conv``'s constructor.

    .. math:: y = x * \Big(g \frac{v}{\lVert v \rVert}\Big) + b

    Parameters ``v`` ``(*kernel_size, in / feature_group_count, out)``, ``g`` (out,), ``bias``;
    every ``flax.nnx.Conv`` argument with its meaning (padding modes, dilations, groups,
    mask). The arithmetic is :func:`normzoo.functional.weight_norm` and :func:`normzoo.functional.conv`.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> conv = nznnx.WeightNormConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
      >>> conv(jax.random.normal(jax.random.key(1), (2, 8, 8, 3))).shape, conv.v[...].shape
      ((2, 8, 8, 4), (3, 3, 3, 4))
    """

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
        self._configure(_config(locals()), rngs, "v", kernel_init, kernel_metadata, bias_init, bias_metadata, scale_init)


class CosineConv(_Cosine):
    r"""Cosine-normalized convolution (Luo et al. 2017) with ``flax.nnx.Conv``'s constructor.

    .. math:: y_{p,j} = s \frac{w_j \cdot x_p}{\lVert w_j \rVert \, \lVert x_p \rVert} + b_j

    ``use_bias`` defaults to False; ``use_scale`` learns ``scale``. The arithmetic is
    :func:`normzoo.functional.cosine_conv` (patch norms by a box filter, never extracted patches).

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> conv = nznnx.CosineConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
      >>> conv(jax.random.normal(jax.random.key(1), (2, 6, 6, 3))).shape
      (2, 6, 6, 4)
    """

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
        self._configure(_config(locals()), rngs, "kernel", kernel_init, kernel_metadata, bias_init, bias_metadata,
                        scale_init)


# ----------------------------------------------------------------------------- ported from PyTorch (timm)


class _Channelwise(nnx.Module):
    """FRN, GRN and EvoNorm: ``scale`` and ``bias`` (and the layer's own parameter) per channel,
    promoted with ``x`` as flax.nnx's layers promote theirs."""

    if TYPE_CHECKING:
        scale: Any
        bias: Any
        dtype: Any
        promote_dtype: Any
        scale_plus_one: bool
        v: Any
        tau: Any

    def _configure(self, num_features, scale_init, bias_init, use_scale, use_bias, param_dtype, dtype, promote_dtype,
                   scale_plus_one, rngs, extra: tuple[str, bool, Any] | None = None):
        shape = (int(num_features),)
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype, {})
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, {})
        if extra is not None:
            name, use, init = extra
            setattr(self, name, _param(use, init, rngs, shape, param_dtype, {}))
        self.num_features, self.dtype, self.param_dtype = num_features, dtype, param_dtype
        self.use_scale, self.use_bias, self.promote_dtype = use_scale, use_bias, promote_dtype

    def _promoted(self, x: Array, *others: Any) -> tuple:
        x, scale, bias, *rest = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias), *[_value(o) for o in others]), dtype=self.dtype)
        return (x, _plus_one(scale, self.scale_plus_one), bias, *rest)


class FilterResponseNorm(_Channelwise):
    r"""Filter response normalization with its TLU as an ``nnx.Module``:
    :class:`normzoo.FilterResponseNorm`'s twin (timm's ``FilterResponseNormTlu2d``, channels last).

    .. math:: y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta,\ \tau\Big)

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> y = nznnx.FilterResponseNorm(1, rngs=nnx.Rngs(0))(jnp.array([[[3.0], [-4.0]]]))
      >>> [round(float(v), 3) for v in y.ravel()]         # x / rms, then max(., tau = 0)
      [0.849, 0.0]

    Args: ``num_features`` (channels, last axis), then :class:`normzoo.FilterResponseNorm`'s
    fields as keywords, and ``rngs``.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True, bias_init: Any = initializers.zeros_init(),
                 scale_init: Any = initializers.ones_init(), use_tau: bool = True,
                 tau_init: Any = initializers.zeros_init(), promote_dtype: Any = _flax_dtypes.promote_dtype,
                 rngs: nnx.Rngs, scale_plus_one: bool = False):
        self._configure(num_features, scale_init, bias_init, use_scale, use_bias, param_dtype, dtype, promote_dtype,
                        scale_plus_one, rngs, ("tau", use_tau, tau_init))
        self.epsilon, self.use_tau = epsilon, use_tau

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (channels last); ``mask`` selects what enters the mean square."""
        x, scale, bias, tau = self._promoted(x, self.tau)
        return F.filter_response_norm(x, scale, bias, tau, epsilon=self.epsilon, mask=mask, dtype=self.dtype)


class GlobalResponseNorm(_Channelwise):
    r"""Global response normalization as an ``nnx.Module``: :class:`normzoo.GlobalResponseNorm`'s
    twin (ConvNeXt V2; timm's ``GlobalResponseNorm``, channels last).

    .. math:: y = x + \gamma (x N) + \beta, \quad N_{n,c} = \frac{\lVert x_{n,\cdot,c} \rVert_2}{\mathrm{mean}_c \lVert x_{n,\cdot,c} \rVert_2 + \epsilon}

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> x = jnp.ones((1, 2, 3))
      >>> bool((nznnx.GlobalResponseNorm(3, rngs=nnx.Rngs(0))(x) == x).all())     # the identity at init
      True

    Args: ``num_features``, then :class:`normzoo.GlobalResponseNorm`'s fields, and ``rngs``.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None, param_dtype: Any = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True, bias_init: Any = initializers.zeros_init(),
                 scale_init: Any = initializers.zeros_init(), promote_dtype: Any = _flax_dtypes.promote_dtype,
                 rngs: nnx.Rngs, scale_plus_one: bool = False):
        self._configure(num_features, scale_init, bias_init, use_scale, use_bias, param_dtype, dtype, promote_dtype,
                        scale_plus_one, rngs)
        self.epsilon = epsilon

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Applies GRN to ``x`` (channels last)."""
        x, scale, bias = self._promoted(x)
        return F.global_response_norm(x, scale, bias, epsilon=self.epsilon, mask=mask, dtype=self.dtype)


class EvoNormS0(_Channelwise):
    r"""EvoNorm-S0 as an ``nnx.Module``: :class:`normzoo.EvoNormS0`'s twin (timm's ``EvoNorm2dS0``).

    .. math:: y = \gamma \frac{x \, \mathrm{sigmoid}(v x)}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} + \beta

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> nznnx.EvoNormS0(8, num_groups=2, rngs=nnx.Rngs(0))(jax.random.normal(jax.random.key(0), (2, 4, 8))).shape
      (2, 4, 8)

    Args: ``num_features``, then :class:`normzoo.EvoNormS0`'s fields, and ``rngs``.
    """

    def __init__(self, num_features: int, *, num_groups: int | None = 32, group_size: int | None = None,
                 epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
                 use_scale: bool = True, bias_init: Any = initializers.zeros_init(),
                 scale_init: Any = initializers.ones_init(), use_v: bool = True, v_init: Any = initializers.ones_init(),
                 promote_dtype: Any = _flax_dtypes.promote_dtype, rngs: nnx.Rngs, scale_plus_one: bool = False):
        self._configure(num_features, scale_init, bias_init, use_scale, use_bias, param_dtype, dtype, promote_dtype,
                        scale_plus_one, rngs, ("v", use_v, v_init))
        self.num_groups, self.group_size, self.epsilon, self.use_v = num_groups, group_size, epsilon, use_v

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Applies EvoNorm-S0 to ``x`` (channels last)."""
        x, scale, bias, v = self._promoted(x, self.v)
        return F.evonorm_s0(x, scale, bias, v, num_groups=self.num_groups, group_size=self.group_size,
                            epsilon=self.epsilon, mask=mask, dtype=self.dtype)


class EvoNormB0(_Channelwise, _RunningAverage):
    r"""EvoNorm-B0 as an ``nnx.Module``: :class:`normzoo.EvoNormB0`'s twin (timm's ``EvoNorm2dB0``),
    with ``use_running_average`` as flax.nnx.BatchNorm's (``model.train()`` / ``eval()``).

    .. math:: y = \gamma \frac{x}{\max\big(\sqrt{\sigma^2_{B,c} + \epsilon},\ v x + \sqrt{\sigma^2_{n,c} + \epsilon}\big)} + \beta

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.EvoNormB0(3, rngs=nnx.Rngs(0))
      >>> y = layer(jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3)
      >>> bool((layer.var[...] != 1).all())       # the running variance moved
      True

    Args: ``num_features``, then :class:`normzoo.EvoNormB0`'s fields, and ``rngs``.
    """

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, momentum: float = 0.99,
                 epsilon: float = 1e-3, dtype: Any = None, param_dtype: Any = jnp.float32, use_bias: bool = True,
                 use_scale: bool = True, bias_init: Any = initializers.zeros_init(),
                 scale_init: Any = initializers.ones_init(), axis_name: str | None = None,
                 axis_index_groups: Any = None, use_v: bool = True, v_init: Any = initializers.ones_init(),
                 promote_dtype: Any = _flax_dtypes.promote_dtype, rngs: nnx.Rngs,
                 virtual_batch_size: int | None = None, scale_plus_one: bool = False):
        self.var = nnx.BatchStat(jnp.ones((int(num_features),), jnp.float32))
        self._configure(num_features, scale_init, bias_init, use_scale, use_bias, param_dtype, dtype, promote_dtype,
                        scale_plus_one, rngs, ("v", use_v, v_init))
        self.use_running_average, self.momentum, self.epsilon = use_running_average, momentum, epsilon
        self.axis_name, self.axis_index_groups, self.use_v = axis_name, axis_index_groups, use_v
        self.virtual_batch_size = virtual_batch_size

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Applies EvoNorm-B0 to ``x``: the batch's variance in training (running one updated),
        the running one with ``use_running_average`` (the call's value, else the attribute)."""
        training = not _first_from(use_running_average, self.use_running_average, "EvoNormB0")
        stored = self.var[...]
        x, scale, bias, v, var = self._promoted(x, self.v, self.var)
        y, new = F._evonorm_b0_map(
            x, stored if training else var, scale, bias, v, training=training, momentum=self.momentum,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            virtual_batch_size=self.virtual_batch_size, dtype=self.dtype, layer="EvoNormB0",
        )
        if training and new is not None:
            self.var[...] = new
        return y


class IterNorm(_RunningAverage):
    r"""Iterative normalization as an ``nnx.Module``: :class:`normzoo.IterNorm`'s twin (Huang et al.
    2019, arXiv:1904.03441), with ``use_running_average`` as flax.nnx.BatchNorm's
    (``model.train()`` / ``model.eval()``).

    .. math:: y = \gamma \odot \big((x - \mu_B) W^\top\big) + \beta, \quad
              W = P_T / \sqrt{\mathrm{tr}\,\Sigma}, \quad
              P_k = \tfrac12 \big(3 P_{k-1} - P_{k-1}^3 \Sigma / \mathrm{tr}\,\Sigma\big)

    per group of ``group_size`` channels, with the batch's mean and covariance in training (the
    running ``mean`` and ``whitening`` updated), the running ones at inference. The arithmetic is
    :func:`normzoo.functional.iter_norm`.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.IterNorm(6, group_size=3, rngs=nnx.Rngs(0))
      >>> y = layer(jax.random.normal(jax.random.key(0), (16, 6)))
      >>> layer.mean[...].shape, layer.whitening[...].shape
      ((6,), (2, 3, 3))

    Args: ``num_features`` (the number of channels), then :class:`normzoo.IterNorm`'s fields in
    its order (``promote_dtype`` as flax.nnx's layers), ``rngs``, and the keyword-only
    ``virtual_batch_size`` and ``scale_plus_one``.
    """

    def __init__(self, num_features: int, *, use_running_average: bool | None = False, axis: int = -1,
                 momentum: float = 0.99, epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True, bias_init: Any = initializers.zeros_init(),
                 scale_init: Any = initializers.ones_init(), axis_name: str | None = None,
                 axis_index_groups: Any = None, group_size: int = 64, iterations: int = 5,
                 promote_dtype: Any = _flax_dtypes.promote_dtype, rngs: nnx.Rngs,
                 virtual_batch_size: int | None = None, scale_plus_one: bool = False):
        shape = _shape(num_features, axis, "IterNorm")
        if len(shape) != 1:
            raise ValueError(f"IterNorm: axis={axis!r} names {len(shape)} axes; IterNorm whitens the channels of "
                             "one feature axis: give one int (e.g. axis=-1 for channels last).")
        groups, size = F._whitening_groups(shape[0], group_size, "IterNorm")
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.whitening = nnx.BatchStat(jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), (groups, size, size)))
        self.scale, self.scale_plus_one = _scale(use_scale, scale_init, scale_plus_one, rngs, shape, param_dtype, {})
        self.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, {})
        self.num_features, self.use_running_average, self.axis = num_features, use_running_average, axis
        self.momentum, self.epsilon, self.dtype, self.param_dtype = momentum, epsilon, dtype, param_dtype
        self.use_bias, self.use_scale, self.axis_name, self.axis_index_groups = use_bias, use_scale, axis_name, axis_index_groups
        self.group_size, self.iterations, self.promote_dtype = group_size, iterations, promote_dtype
        self.virtual_batch_size = virtual_batch_size

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Whitens ``x``: with the batch's statistics (running ones updated) or, if
        ``use_running_average`` (the call's value, else the attribute), the running ones."""
        training = not _first_from(use_running_average, self.use_running_average, "IterNorm")
        stored = (self.mean[...], self.whitening[...])
        x, mean, whitening, scale, bias = self.promote_dtype(
            (x, *stored, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        if training:
            mean, whitening = stored
        y, new = F._iter_map(
            x, mean, whitening, _plus_one(scale, self.scale_plus_one), bias,
            training=training, group_size=self.group_size, iterations=self.iterations, momentum=self.momentum,
            epsilon=self.epsilon, axis=self.axis, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, virtual_batch_size=self.virtual_batch_size, dtype=self.dtype,
            layer="IterNorm",
        )
        if training:
            self.mean[...], self.whitening[...] = new.mean, new.whitening
        return y


# ----------------------------------------------------------------------------- registry


class _Standardized(_WeightLayer):
    """The weight-standardized layers: the kernel standardized per output unit over its fan-in
    (:func:`normzoo.functional.weight_standardize`), scaled by ``gain * gamma / sqrt(fan_in)``
    where the layer has a ``gain``."""

    if TYPE_CHECKING:
        gamma: float

    def _apply(self, op, x: Array, sumsq) -> Array:
        kernel = self.kernel[...]
        gain = _value(getattr(self, "gain", None))
        scale = 1.0 if gain is None else self.gamma * math.prod(kernel.shape[:-1]) ** -0.5
        kernel = F.weight_standardize(kernel, gain, scale=scale, epsilon=self.epsilon, mask=getattr(self, "mask", None),
                                      dtype=self.dtype)
        x, kernel, bias = self.promote_dtype((x, kernel, _value(self.bias)), dtype=self.dtype)
        return F._add_bias(op(x, kernel), bias)


class StdLinear(_Standardized):
    r"""Linear layer with a standardized kernel: :class:`normzoo.StdDense`'s twin, with
    ``flax.nnx.Linear``'s constructor (then ``epsilon``).

    .. math:: y = x \cdot \frac{w - \mathrm{E}[w]}{\sqrt{\mathrm{Var}[w] + \epsilon}} + b

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> nznnx.StdLinear(5, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 5))).shape
      (2, 3)
    """

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
        epsilon: float = 1e-6,
    ):
        self._configure(_config(locals()), rngs, "kernel", kernel_init, kernel_metadata, bias_init, bias_metadata, None)


class ScaledStdLinear(_Standardized):
    r"""NF-Nets' scaled weight-standardized linear layer: :class:`normzoo.ScaledStdDense`'s twin,
    with ``flax.nnx.Linear``'s constructor (then ``gamma``, ``epsilon``, ``gain_init``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> nznnx.ScaledStdLinear(5, 3, rngs=nnx.Rngs(0)).gain[...].shape
      (3,)
    """

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
        gamma: float = 1.0,
        epsilon: float = 1e-6,
        gain_init: Any = initializers.ones_init(),
    ):
        config = _config(locals())
        gain_init = config.pop("gain_init")
        self._configure(config, rngs, "kernel", kernel_init, kernel_metadata, bias_init, bias_metadata, None)
        self.gain = nnx.Param(gain_init(rngs.params(), (out_features,), param_dtype))


class StdConv(_Standardized):
    r"""Convolution with a standardized kernel: :class:`normzoo.StdConv`'s twin, with
    ``flax.nnx.Conv``'s constructor (then ``epsilon``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> nznnx.StdConv(3, 4, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 3))).shape
      (1, 6, 6, 4)
    """

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
        epsilon: float = 1e-6,
    ):
        self._configure(_config(locals()), rngs, "kernel", kernel_init, kernel_metadata, bias_init, bias_metadata, None)


class ScaledStdConv(_Standardized):
    r"""NF-Nets' scaled weight-standardized convolution: :class:`normzoo.ScaledStdConv`'s twin,
    with ``flax.nnx.Conv``'s constructor (then ``gamma``, ``epsilon``, ``gain_init``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> nznnx.ScaledStdConv(3, 4, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 3))).shape
      (1, 6, 6, 4)
    """

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
        gamma: float = 1.0,
        epsilon: float = 1e-6,
        gain_init: Any = initializers.ones_init(),
    ):
        config = _config(locals())
        gain_init = config.pop("gain_init")
        self._configure(config, rngs, "kernel", kernel_init, kernel_metadata, bias_init, bias_metadata, None)
        self.gain = nnx.Param(gain_init(rngs.params(), (out_features,), param_dtype))


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


def _twins() -> dict:
    from normzoo import _batch, _composite, _sample, _whiten

    return {
        _batch.BatchNorm: BatchNorm, _batch.BatchRenorm: BatchRenorm, _batch.MeanOnlyBatchNorm: MeanOnlyBatchNorm,
        _batch.FrozenBatchNorm: FrozenBatchNorm, _batch.EvoNormB0: EvoNormB0, _whiten.IterNorm: IterNorm, _sample.EvoNormS0: EvoNormS0,
        _sample.FilterResponseNorm: FilterResponseNorm, _sample.GlobalResponseNorm: GlobalResponseNorm,
        _batch.LpBatchNorm: LpBatchNorm, _batch.NoisyBatchNorm: NoisyBatchNorm,
        _sample.LayerNorm: LayerNorm, _sample.RMSNorm: RMSNorm, _sample.GroupNorm: GroupNorm,
        _sample.InstanceNorm: InstanceNorm, _composite.IBN: IBN, _registry.Identity: Identity,
        nn.Dense: nnx.Linear, nn.Conv: nnx.Conv, _weight.WeightNormDense: WeightNormLinear,
        _weight.WeightNormConv: WeightNormConv, _weight.CosineDense: CosineLinear, _weight.CosineConv: CosineConv,
        _weight.StdDense: StdLinear, _weight.StdConv: StdConv, _weight.ScaledStdDense: ScaledStdLinear,
        _weight.ScaledStdConv: ScaledStdConv,
    }


_TWINS = _twins()


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


# ----------------------------------------------------------------------------- wrappers


class _Reparameterized(nnx.Module):
    """Calls ``layer_instance`` with some of its parameters replaced by functions of them, and
    puts the stored values back afterwards (also when the call raises), so the parameters stay
    the unnormalized ones (flax.nnx writes the normalized ones into the layer, flax#5576)."""

    if TYPE_CHECKING:
        layer_instance: nnx.Module

    def _run(self, transformed: dict, call: Callable[[], Any]) -> Any:
        stored = {path: variable[...] for path, (variable, _) in transformed.items()}
        try:
            for variable, value in transformed.values():
                variable[...] = value
            return call()
        finally:
            for path, (variable, _) in transformed.items():
                variable[...] = stored[path]

    def _parameters(self, predicate: Callable[[tuple, Any], bool]) -> list[tuple[tuple, nnx.Variable]]:
        return [(tuple(path), v) for path, v in nnx.to_flat_state(nnx.state(self.layer_instance))
                if predicate(tuple(path), v)]


class SpectralNorm(_Reparameterized, _RunningAverage):
    r"""Spectral normalization of a layer's weights as an ``nnx.Module``; drop-in for
    ``flax.nnx.SpectralNorm``.

    .. math:: \bar W = W / \sigma(W)

    for every ``nnx.Param`` of ``layer_instance`` with two or more axes, ``sigma`` by
    ``n_steps`` power iterations from the stored ``u`` (:func:`normzoo.functional.spectral_norm`,
    as :class:`normzoo.SpectralNorm`). ``batch_stats`` holds flax.nnx's ``nnx.BatchStat``
    variables, keyed ``path + ('u',)`` and ``path + ('sigma',)``, drawn alike.

    Where normzoo differs: flax.nnx writes ``W / sigma`` into the wrapped layer's parameter at
    every call, so the stored weight shrinks call after call and the optimizer updates the
    normalized copy (flax#5576); here the layer computes with ``W / sigma`` and its parameter
    keeps ``W``. ``exact=True`` (normzoo): ``sigma`` by SVD.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.SpectralNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), n_steps=10, rngs=nnx.Rngs(1))
      >>> kernel = layer.layer_instance.kernel[...]
      >>> y = layer(jnp.ones((2, 4)))
      >>> bool((layer.layer_instance.kernel[...] == kernel).all())     # never overwritten
      True

    Args: ``flax.nnx.SpectralNorm``'s, then ``exact`` (normzoo).
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: nnx.Rngs,
        exact: bool = False,
    ):
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        self.use_running_average = not update_stats
        self.exact = exact
        stats: dict = {}
        for path, param in self._parameters(lambda path, v: isinstance(v, nnx.Param)):
            shape = param[...].shape
            if len(shape) <= 1 or n_steps < 1:
                continue
            if len(shape) > 2 and error_on_non_matrix:
                raise ValueError(
                    f"SpectralNorm: Layer instance parameter is {len(shape)}D but error_on_non_matrix is True "
                    f"({'/'.join(map(str, path))}, shape {shape}); pass error_on_non_matrix=False to normalize it as "
                    "a matrix of its last axis."
                )
            key = rngs.params()
            stats[path + ("u",)] = nnx.BatchStat(initializers.normal()(key, (1, shape[-1]), param_dtype))
            stats[path + ("sigma",)] = nnx.BatchStat(initializers.ones(key, (), param_dtype))
        self.batch_stats = nnx.data(stats)

    def __call__(self, x: Array, update_stats: bool | None = None) -> Array:
        """``layer_instance(x)`` with its weights spectrally normalized; ``update_stats`` (else
        ``not use_running_average``, which ``model.train()`` / ``eval()`` set) stores ``u`` and ``sigma``."""
        if update_stats is None:
            update_stats = not self.use_running_average
        transformed = {}
        for path, param in self._parameters(lambda path, v: isinstance(v, nnx.Param)):
            if param[...].ndim <= 1 or self.n_steps < 1:
                continue
            u, sigma = self.batch_stats.get(path + ("u",)), self.batch_stats.get(path + ("sigma",))
            if u is None or sigma is None:
                raise RuntimeError(
                    f"SpectralNorm: no u and sigma for the parameter {'/'.join(map(str, path))}: the wrapped "
                    "layer's parameters changed after the SpectralNorm was built; build it again."
                )
            out = F.spectral_norm(param[...], u[...], n_steps=self.n_steps, epsilon=self.epsilon, dtype=self.dtype,
                                  exact=self.exact, layer="SpectralNorm")
            if update_stats:
                u[...], sigma[...] = out.u, out.sigma
            transformed[path] = (param, out.kernel)
        return self._run(transformed, lambda: self.layer_instance(x))


class WeightNorm(_Reparameterized):
    r"""Weight normalization of any layer's weights as an ``nnx.Module``; drop-in for
    ``flax.nnx.WeightNorm``.

    .. math:: w = g \frac{v}{\lVert v \rVert}

    for the variables of ``layer_instance`` that ``variable_filter`` selects (default: paths
    containing ``'kernel'``), the norm over every axis but ``feature_axes``, ``g`` in
    ``scales`` keyed by the parameter's path (:func:`normzoo.functional.weight_norm`).

    Where normzoo differs: the scales are ``nnx.Param`` of ``param_dtype`` (flax.nnx keeps raw
    arrays, which get no gradient and ignore ``param_dtype``: flax#5577), and the wrapped
    layer's parameter keeps ``v`` (flax.nnx overwrites it with ``g v/||v||`` at every call,
    flax#5576). ``promote_dtype`` is accepted, as flax's, and not used.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> layer = nznnx.WeightNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
      >>> grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum())(layer)
      >>> sorted(grads.scales), grads.scales[('kernel',)].shape     # the scales learn
      ([('kernel',)], (3,))

    Args: ``flax.nnx.WeightNorm``'s.
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: int | Sequence[int] | None = -1,
        use_scale: bool = True,
        scale_init: Any = initializers.ones,
        epsilon: float = 1e-12,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        variable_filter: Any = nnx.PathContains("kernel"),
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = () if feature_axes is None else feature_axes
        self.use_scale = use_scale
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        scales = {}
        if use_scale:
            for path, variable in self._parameters(self.variable_filter):
                scales[path] = nnx.Param(scale_init(rngs.params(), self._feature_shape(variable[...]), param_dtype))
        self.scales = nnx.data(scales if use_scale else None)

    def _axes(self, value: Array) -> tuple[int, ...]:
        return _stats.canonicalize_axes(value.ndim, self.feature_axes, argument="feature_axes", layer="WeightNorm")

    def _feature_shape(self, value: Array) -> tuple[int, ...]:
        return tuple(value.shape[a] for a in self._axes(value))

    def data_init(self, x: Array, *args, init_scale: float = 1.0, **kwargs) -> Array:
        """Data-dependent initialization (Salimans & Kingma sec. 3; linen's ``data_init=True``):
        sets the scale and the wrapped layer's ``bias`` so that this batch's outputs have zero mean
        and standard deviation ``init_scale`` per feature (the last axis), and returns them. Needs
        one normalized weight whose scale has one entry per output feature.

        Example:
          >>> import jax
          >>> from flax import nnx
          >>> from normzoo import nnx as nznnx
          >>> layer = nznnx.WeightNorm(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
          >>> y = layer.data_init(jax.random.normal(jax.random.key(0), (64, 5)) * 3 + 2)
          >>> [round(float(v), 3) for v in y.std(0)]
          [1.0, 1.0, 1.0]
        """
        y = self(x, *args, **kwargs)
        scales = self.scales
        if scales is None or len(scales) != 1 or next(iter(scales.values()))[...].shape != y.shape[-1:]:
            raise ValueError(
                f"WeightNorm: data_init needs one normalized weight whose scale has one entry per output feature "
                f"(the last axis, {y.shape[-1]}); got scales {None if scales is None else sorted(scales)}. Use "
                "feature_axes=-1 and a variable_filter that selects one kernel."
            )
        mean, var = _stats.moments(y, tuple(range(y.ndim - 1)), layer="WeightNorm")
        g = init_scale * lax.rsqrt(var + 1e-6)
        scale = next(iter(scales.values()))
        scale[...] = jnp.asarray(scale[...] * g, scale[...].dtype)
        bias = getattr(self.layer_instance, "bias", None)
        if isinstance(bias, nnx.Variable) and bias[...] is not None and bias[...].shape == mean.shape:
            bias[...] = jnp.asarray((bias[...] - mean) * g, bias[...].dtype)
            return (y - mean) * g
        return y * g

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        """``layer_instance(x, *args, **kwargs)`` with the selected weights normalized."""
        transformed = {}
        for path, variable in self._parameters(self.variable_filter):
            value = variable[...]
            scale, scales = None, self.scales
            if scales is not None:
                if path not in scales:
                    raise RuntimeError(
                        f"WeightNorm: no scale for the parameter {'/'.join(map(str, path))}: the wrapped layer's "
                        "parameters changed after the WeightNorm was built; build it again."
                    )
                scale = scales[path][...]
            g = jnp.ones(self._feature_shape(value), value.dtype) if scale is None else scale
            kernel = F.weight_norm(value, g, epsilon=self.epsilon, feature_axes=self._axes(value))
            dtype = _flax_dtypes.canonicalize_dtype(*(a for a in (value, scale) if a is not None), dtype=self.dtype)
            transformed[path] = (variable, jnp.asarray(kernel, dtype))
        return self._run(transformed, lambda: self.layer_instance(x, *args, **kwargs))


# ----------------------------------------------------------------------------- freezing


class BatchNormFreeze:
    """What :func:`freeze_batch_norm` replaced: ``undo()`` puts the original layers back
    (idempotent); usable as a context manager."""

    def __init__(self, model: nnx.Module, originals: dict[tuple, nnx.Module]):
        self._model, self._originals = model, originals

    @property
    def paths(self) -> list[str]:
        """The frozen layers' paths in the model, ``'/'``-joined."""
        return ["/".join(map(str, p)) for p in self._originals]

    def undo(self) -> None:
        """Puts every original layer back (its variables are the frozen one's: nothing to copy),
        in the mode it was frozen in: call ``model.train()`` or ``model.eval()`` after it."""
        for path, original in self._originals.items():
            _replace(self._model, path, original)
        self._originals = {}

    def __enter__(self) -> BatchNormFreeze:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _replace(model: nnx.Module, path: tuple, new: Any) -> None:
    parent: Any = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) or not hasattr(parent, str(key)) else getattr(parent, key)
    if isinstance(path[-1], int) or not hasattr(parent, str(path[-1])):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _frozen_twin(layer: Any) -> FrozenBatchNorm:
    frozen = FrozenBatchNorm(
        layer.num_features, axis=layer.axis, epsilon=layer.epsilon, dtype=layer.dtype,
        param_dtype=layer.param_dtype, use_bias=layer.use_bias, use_scale=layer.use_scale,
        promote_dtype=layer.promote_dtype, scale_plus_one=getattr(layer, "scale_plus_one", False),
        rngs=nnx.Rngs(0),
    )
    # The same Variable objects, shared, not copied; the others (BatchRenorm's steps) ride along
    # unused, so that the model's state keeps its structure (checkpoints load either way).
    for name, value in vars(layer).items():
        if name in ("mean", "var", "scale", "bias") or isinstance(value, nnx.Variable):
            setattr(frozen, name, value)
    return frozen


def freeze_batch_norm(model: nnx.Module) -> BatchNormFreeze:
    r"""Replaces, in place, every batch normalizer of ``model`` by a :class:`FrozenBatchNorm`
    holding the same variables: by its stored statistics whatever the mode
    (``model.train()`` included), updating nothing, with no gradient to its statistics, ``scale``
    or ``bias``. For fine-tuning, as torchvision's ``FrozenBatchNorm2d`` swap and timm's
    ``freeze_batch_norm_2d``; the returned object's ``undo()`` is the reverse.

    .. math:: y = \mathrm{sg}(\gamma) \frac{x - \mathrm{sg}(\mu)}{\sqrt{\mathrm{sg}(\sigma^2) + \epsilon}} + \mathrm{sg}(\beta)

    Covers ``flax.nnx.BatchNorm`` and normzoo's BatchNorm, BatchRenorm, LpBatchNorm,
    NoisyBatchNorm and IBN's batch part (not the model itself: freeze the model that holds it).
    The frozen parameters get zero gradients, but an optimizer's weight decay would still move
    them: leave them out of its ``wrt`` filter (their paths are ``.paths``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from normzoo import nnx as nznnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> freeze = nznnx.freeze_batch_norm(model)
      >>> freeze.paths, type(model.layers[1]).__name__
      (['layers/1'], 'FrozenBatchNorm')
      >>> y = model(jnp.ones((2, 3)))                  # training mode: the stored statistics, unchanged
      >>> freeze.undo(); type(model.layers[1]).__name__
      'BatchNorm'
    """
    batch = (nnx.BatchNorm, BatchNorm, BatchRenorm, LpBatchNorm, NoisyBatchNorm)
    originals: dict[tuple, nnx.Module] = {
        tuple(path): node for path, node in nnx.iter_graph(model)
        if isinstance(node, batch) and not isinstance(node, FrozenBatchNorm) and path}
    for path, layer in originals.items():
        _replace(model, path, _frozen_twin(layer))
    return BatchNormFreeze(model, originals)
