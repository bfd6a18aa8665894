"""Per-sample family: LayerNorm, RMSNorm, GroupNorm, InstanceNorm.

Fields are flax.linen's, in flax's order with flax's defaults; normzoo-only fields come
after them and are keyword-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from normzoo import _stats
from normzoo import functional as F
from normzoo._batch import _Shell
from normzoo._stats import AffineMap

Array = jax.Array
Initializer = Any
Axes = Any


def _axes(mdl: nn.Module, x: Array, name: str) -> tuple[int, ...]:
    return _stats.canonicalize_axes(x.ndim, getattr(mdl, name), argument=name, layer=type(mdl).__name__)


def _options(mdl: nn.Module, mask: Array | None) -> dict[str, Any]:
    return dict(epsilon=mdl.epsilon, mask=mask, axis_name=mdl.axis_name, axis_index_groups=mdl.axis_index_groups,
                dtype=mdl.dtype, layer=type(mdl).__name__)


class LayerNorm(_Shell):
    r"""Layer normalization (Ba et al. 2016, arXiv:1607.06450); drop-in for ``flax.linen.LayerNorm``.

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with mean and variance over ``reduction_axes`` of each example (default: the last
    axis) and ``gamma, beta`` over ``feature_axes``. The variance is computed stably (see
    ``normzoo._stats``), so inputs with ``|mean| >> std`` keep their precision.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jnp.array([[1.0, 2.0, 3.0], [1e4, 1e4 + 1.0, 1e4 + 2.0]])
      >>> y, _ = normzoo.LayerNorm().init_with_output(jax.random.key(0), x)
      >>> [[round(float(v), 3) for v in row] for row in y]
      [[-1.225, 0.0, 1.225], [-1.225, 0.0, 1.225]]

    Attributes:
      epsilon: added to the variance.
      dtype: result dtype (default: promote input and params, as flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``beta`` / ``gamma``.
      bias_init, scale_init: their initializers.
      reduction_axes: axes to normalize over.
      feature_axes: axes that get their own ``scale`` and ``bias``.
      axis_name, axis_index_groups: combine statistics across a mapped axis (only needed
        when one example is split across devices, e.g. sequence parallelism); weighted by
        counts, where flax averages the devices' means.
      use_fast_variance: accepted for flax compatibility; ignored (always stable).
      force_float32_reductions: as flax, except that statistics are always reduced in at
        least float32; False only casts ``scale`` and ``bias`` to ``param_dtype``.
      scale_plus_one: (keyword-only, normzoo) store the scale as an offset from 1, as
        Gemma's RMSNorm: the layer multiplies by ``1 + scale``, and the default
        ``scale_init`` (ones) becomes zeros. RMSNorm, GroupNorm and InstanceNorm have it too.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; ``mask`` (boolean, broadcastable) selects what enters the statistics."""
        reduction_axes, feature_axes = _axes(self, x, "reduction_axes"), _axes(self, x, "feature_axes")
        scale, bias = self._affine(F._feature_shape(x, feature_axes))
        return F._sample_map(x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
                             use_mean=True, **_options(self, mask))(x)


class RMSNorm(_Shell):
    r"""Root-mean-square normalization (Zhang & Sennrich 2019, arXiv:1910.07467); drop-in for ``flax.linen.RMSNorm``.

    .. math:: y = \gamma \frac{x}{\sqrt{\mathrm{E}[|x|^2] + \epsilon}}

    No centring and, by default, no bias. Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> y, _ = normzoo.RMSNorm().init_with_output(jax.random.key(0), jnp.array([[3.0, 4.0]]))
      >>> [round(float(v), 3) for v in (y * jnp.sqrt(12.5))[0]]
      [3.0, 4.0]

    Attributes:
      epsilon, dtype, param_dtype, use_scale, scale_init, reduction_axes, feature_axes,
      axis_name, axis_index_groups, use_fast_variance, force_float32_reductions: as
      :class:`LayerNorm`, in flax.linen.RMSNorm's order.
      use_bias: (keyword-only, normzoo) add a learned bias after the scaling (default False).
      bias_init: (keyword-only, normzoo) its initializer.
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    use_bias: bool = dataclasses.field(default=False, kw_only=True)
    bias_init: Initializer = dataclasses.field(default=initializers.zeros, kw_only=True)
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` by its root mean square over ``reduction_axes``."""
        reduction_axes, feature_axes = _axes(self, x, "reduction_axes"), _axes(self, x, "feature_axes")
        scale, bias = self._affine(F._feature_shape(x, feature_axes))
        return F._sample_map(x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
                             use_mean=False, **_options(self, mask))(x)


class GroupNorm(_Shell):
    r"""Group normalization (Wu & He 2018, arXiv:1803.08494); drop-in for ``flax.linen.GroupNorm``.

    The channels (last axis) are split into ``num_groups`` groups of ``group_size``
    consecutive channels; each example's group is normalized over its channels and
    ``reduction_axes`` (default: all axes but the first), then a per-channel affine
    map is applied:

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} + \beta_c

    Statistics are computed per channel over the spatial axes, in the input's own layout,
    and the channels of each group are then merged with Chan's parallel formula (the same
    one that merges devices); only these small per-(example, channel) statistics are
    regrouped, so the activations are never reshaped or copied.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
      >>> y, v = normzoo.GroupNorm(2).init_with_output(jax.random.key(1), x)
      >>> y.shape, v['params']['scale'].shape
      ((2, 4, 4, 8), (8,))

    Attributes:
      num_groups: number of groups (default 32); pass None to use ``group_size``.
      group_size: channels per group, instead of ``num_groups``.
      reduction_axes: axes to normalize over; must include the last (channel) axis
        (default: every axis but the first, as flax).
      (others): as :class:`LayerNorm`, in flax.linen.GroupNorm's order.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` per example and channel group."""
        scale, bias = self._affine(x.shape[-1:])
        return F._group_map(x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
                            reduction_axes=self.reduction_axes, **_options(self, mask))(x)


class InstanceNorm(_Shell):
    r"""Instance normalization (Ulyanov et al. 2016, arXiv:1607.08022); drop-in for ``flax.linen.InstanceNorm``.

    Each example and channel is normalized over the remaining (spatial) axes:

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

    With ``track_running_stats=True`` (PyTorch's option, off by default) the batch average
    of the instance statistics is kept in ``batch_stats/{mean,var}`` and used instead when
    ``use_running_average`` is True.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3)) * 4 + 7
      >>> y, _ = normzoo.InstanceNorm().init_with_output(jax.random.key(1), x)
      >>> round(float(jnp.abs(y.mean((1, 2))).max()), 4)
      0.0

    Attributes:
      feature_axes: channel axes (default -1); must not include axis 0, the batch.
      (others, in flax.linen.InstanceNorm's order): as :class:`LayerNorm`.
      track_running_stats: (keyword-only, normzoo) keep running averages of the instance
        statistics.
      use_running_average: (keyword-only, normzoo) with ``track_running_stats``, normalize
        with them; may be given at call time.
      momentum: (keyword-only, normzoo) decay of the running averages (flax convention).
    """

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    track_running_stats: bool = dataclasses.field(default=False, kw_only=True)
    use_running_average: bool | None = dataclasses.field(default=None, kw_only=True)
    momentum: float = dataclasses.field(default=0.99, kw_only=True)
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(
        self, x: Array, *, mask: Array | None = None, use_running_average: bool | None = None
    ) -> Array:
        """Normalizes ``x`` per example and channel (``use_running_average``: see the class)."""
        return self._map(x, mask, use_running_average)(x)

    @nn.compact
    def affine_map(
        self, x: Array, *, mask: Array | None = None, use_running_average: bool | None = None
    ) -> AffineMap:
        """The per-example, per-channel map ``y = (x - mean) * mul + add`` that ``__call__``
        applies to ``x`` (same arguments and variables); IBN joins it with BatchNorm's."""
        return self._map(x, mask, use_running_average)

    @nn.nowrap
    def _map(self, x: Array, mask: Array | None, use_running_average: bool | None) -> AffineMap:
        feature_axes = _axes(self, x, "feature_axes")
        scale, bias = self._affine(F._feature_shape(x, feature_axes))
        training, running = True, [None, None]
        if self.track_running_stats:
            use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
            training, running = not use_ra, self._running(F._feature_shape(x, feature_axes))
        amap, new = F._instance_map(
            x, scale, bias, *(self._read(running, training) if self.track_running_stats else running), training=training,
            momentum=self.momentum, feature_axes=self.feature_axes, **_options(self, mask),
        )
        self._store(running, new, x, training)
        return amap
