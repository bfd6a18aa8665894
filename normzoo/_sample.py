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


class _ChannelFields(_Shell):
    """The fields of the channel-wise layers ported from PyTorch (channels last), flax's names."""

    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones

    @nn.nowrap
    def _channels(self, x: Array) -> tuple[int, ...]:
        if x.ndim < 2:
            raise ValueError(f"{type(self).__name__}: x has shape {x.shape}; it needs a batch axis and a channel axis "
                             "(last).")
        return (x.shape[-1],)


class FilterResponseNorm(_ChannelFields):
    r"""Filter response normalization with the thresholded linear unit (Singh & Krishnan 2020,
    arXiv:1911.09737); timm's ``FilterResponseNormTlu2d``, channels last.

    .. math:: y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta,\ \tau\Big), \qquad
              \nu^2 = \mathrm{E}_{\text{spatial}}[x^2]

    per example and channel, no centring and no batch dependence: a normalization and its
    activation in one layer (registry ``frn``: use it in place of BatchNorm + ReLU; the
    registry's models add their ReLU after it, which the TLU makes redundant only where
    ``tau >= 0``). The arithmetic is :func:`normzoo.functional.filter_response_norm`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3)) * 5
      >>> y, v = normzoo.FilterResponseNorm().init_with_output(jax.random.key(1), x)
      >>> sorted(v['params']), float(y.min()) >= 0.0          # tau starts at 0: a ReLU at init
      (['bias', 'scale', 'tau'], True)

    Attributes:
      epsilon: added to the mean square (timm's default; the paper's is 1e-6).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as :class:`LayerNorm`.
      use_tau: the TLU's learned threshold ``tau`` (timm's ``apply_act``); False: no activation.
      tau_init: its initializer (zeros).
      scale_plus_one: (keyword-only) as :class:`LayerNorm`.
    """

    epsilon: float = 1e-5
    use_tau: bool = True
    tau_init: Initializer = initializers.zeros
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` (channels last); ``mask`` selects what enters the mean square."""
        shape = self._channels(x)
        scale, bias = self._affine(shape)
        tau = self.param("tau", self.tau_init, shape, self.param_dtype) if self.use_tau else None
        return F.filter_response_norm(x, scale, bias, tau, epsilon=self.epsilon, mask=mask, dtype=self.dtype)


class GlobalResponseNorm(_ChannelFields):
    r"""Global response normalization (Woo et al. 2023, ConvNeXt V2, arXiv:2301.00808); timm's
    ``GlobalResponseNorm``, channels last.

    .. math:: G_{n,c} = \lVert x_{n,\cdot,c} \rVert_2, \quad N_{n,c} = \frac{G_{n,c}}{\mathrm{mean}_c G_{n,c} + \epsilon},
              \quad y = x + \gamma (x N) + \beta

    Channel competition inside ConvNeXt V2's MLP blocks; ``scale`` and ``bias`` start at zero,
    so the layer starts as the identity (registry ``grn``). The arithmetic is
    :func:`normzoo.functional.global_response_norm`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
      >>> y, v = normzoo.GlobalResponseNorm().init_with_output(jax.random.key(1), x)
      >>> bool(jnp.array_equal(y, x)), v['params']['scale'].tolist()
      (True, [0.0, 0.0, 0.0])

    Attributes:
      epsilon: added to the channels' mean norm.
      dtype, param_dtype, use_bias, use_scale: as :class:`LayerNorm`.
      bias_init, scale_init: zeros (ConvNeXt V2's).
      scale_plus_one: (keyword-only) as :class:`LayerNorm` (``scale`` then starts at -1).
    """

    epsilon: float = 1e-6
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.zeros
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Applies GRN to ``x`` (channels last); ``mask`` selects what enters the norms."""
        scale, bias = self._affine(self._channels(x))
        return F.global_response_norm(x, scale, bias, epsilon=self.epsilon, mask=mask, dtype=self.dtype)


class EvoNormS0(_ChannelFields):
    r"""EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967); timm's ``EvoNorm2dS0``, channels last.

    .. math:: y = \gamma \frac{x \, \mathrm{sigmoid}(v x)}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} + \beta

    a normalization-activation layer with GroupNorm's statistics (stable) and a learned
    Swish-like gate ``v`` per channel; no batch dependence (registry ``evonorm_s0``). The
    arithmetic is :func:`normzoo.functional.evonorm_s0`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) + 1e4
      >>> y, v = normzoo.EvoNormS0(num_groups=2).init_with_output(jax.random.key(1), x)
      >>> sorted(v['params']), bool(jnp.isfinite(y).all())
      (['bias', 'scale', 'v'], True)

    Attributes:
      num_groups, group_size: as :class:`GroupNorm` (timm's default: 32 groups).
      epsilon: added to the group variance.
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as :class:`LayerNorm`.
      use_v: the gate ``v`` and the normalization (timm's ``apply_act``); False: affine only.
      v_init: its initializer (ones).
      scale_plus_one: (keyword-only) as :class:`LayerNorm`.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    use_v: bool = True
    v_init: Initializer = initializers.ones
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Applies EvoNorm-S0 to ``x`` (channels last); ``mask`` selects what enters the statistics."""
        shape = self._channels(x)
        scale, bias = self._affine(shape)
        v = self.param("v", self.v_init, shape, self.param_dtype) if self.use_v else None
        return F.evonorm_s0(x, scale, bias, v, num_groups=self.num_groups, group_size=self.group_size,
                            epsilon=self.epsilon, mask=mask, dtype=self.dtype)
