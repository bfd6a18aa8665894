"""Per-sample family: LayerNorm, RMSNorm, GroupNorm, InstanceNorm."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers
from jax import lax

from normzoo import _stats

Array = jax.Array
Initializer = Any
Axes = Any


class _SampleFamily(nn.Module):
    """Fields shared with flax.linen's per-sample layers."""

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True

    # Return the AffineMap instead of applying it (set by IBN's parts; not a dataclass field).
    _return_map = False

    def _apply(self, x, mask, reduction_axes, feature_axes, *, use_mean=True, stats=None):
        """Normalizes ``x`` over ``reduction_axes`` with per-``feature_axes`` params."""
        if stats is None:
            stats = _stats.moments(
                x, reduction_axes, mask=mask, use_mean=use_mean, dtype=self.dtype,
                axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                layer=type(self).__name__,
            )
        mean, var = stats
        return _stats.normalize(
            self, x, _stats.expand(mean, reduction_axes),
            _stats.expand(lax.rsqrt(var + self.epsilon), reduction_axes),
            param_shape=tuple(x.shape[a] for a in feature_axes),
            param_view=_stats.feature_view(x.ndim, feature_axes, x.shape),
            dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias and use_mean,
            use_scale=self.use_scale, bias_init=self.bias_init, scale_init=self.scale_init,
            return_map=self._return_map,
        )


    def _apply_over_axes(self, x, mask, *, use_mean):
        """LayerNorm/RMSNorm: statistics over ``reduction_axes``, parameters over ``feature_axes``."""
        layer = type(self).__name__
        red = _stats.canonicalize_axes(x.ndim, self.reduction_axes, argument="reduction_axes", layer=layer)
        feat = _stats.canonicalize_axes(x.ndim, self.feature_axes, argument="feature_axes", layer=layer)
        return self._apply(x, mask, red, feat, use_mean=use_mean)


class LayerNorm(_SampleFamily):
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
        when one example is split across devices, e.g. sequence parallelism).
      use_fast_variance: accepted for flax compatibility; ignored (always stable).
    """

    reduction_axes: Axes = -1
    feature_axes: Axes = -1

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; ``mask`` (boolean, broadcastable) selects what enters the statistics."""
        return self._apply_over_axes(x, mask, use_mean=True)


class RMSNorm(_SampleFamily):
    r"""Root-mean-square normalization (Zhang & Sennrich 2019, arXiv:1910.07467); drop-in for ``flax.linen.RMSNorm``.

    .. math:: y = \gamma \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}}

    No centring and no bias. Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> y, _ = normzoo.RMSNorm().init_with_output(jax.random.key(0), jnp.array([[3.0, 4.0]]))
      >>> [round(float(v), 3) for v in (y * jnp.sqrt(12.5))[0]]
      [3.0, 4.0]

    Attributes:
      epsilon, dtype, param_dtype, use_scale, scale_init, reduction_axes, feature_axes,
      axis_name, axis_index_groups, use_fast_variance: as :class:`LayerNorm`.
    """

    use_bias: bool = False
    reduction_axes: Axes = -1
    feature_axes: Axes = -1

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` by its root mean square over ``reduction_axes``."""
        return self._apply_over_axes(x, mask, use_mean=False)


class GroupNorm(_SampleFamily):
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
      >>> y, v = normzoo.GroupNorm(num_groups=2).init_with_output(jax.random.key(1), x)
      >>> y.shape, v['params']['scale'].shape
      ((2, 4, 4, 8), (8,))

    Attributes:
      num_groups: number of groups (default 32); pass None to use ``group_size``.
      group_size: channels per group, instead of ``num_groups``.
      reduction_axes: axes to normalize over; must include the last (channel) axis.
      (others): as :class:`LayerNorm`.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    reduction_axes: Axes | None = None

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` per example and channel group."""
        layer = type(self).__name__
        if x.ndim < 2:
            raise ValueError(
                f"{layer}: the input needs a batch and a channel axis, got shape {tuple(x.shape)}."
            )
        red = self.reduction_axes
        if red is None:
            red = tuple(range(1, x.ndim))
        red = _stats.canonicalize_axes(x.ndim, red, argument="reduction_axes", layer=layer)
        if red[-1] != x.ndim - 1:
            raise ValueError(
                f"{layer}: reduction_axes={self.reduction_axes!r} must include the last "
                "(channel) axis, which is split into groups; add -1."
            )
        channels = x.shape[-1]
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError(
                f"{layer}: give exactly one of num_groups={self.num_groups!r} and "
                f"group_size={self.group_size!r}; to use group_size pass num_groups=None "
                "(num_groups defaults to 32)."
            )
        if self.group_size is not None:
            if self.group_size <= 0 or channels % self.group_size:
                raise ValueError(
                    f"{layer}: group_size={self.group_size} must be positive and divide the "
                    f"{channels} channels of the input (shape {tuple(x.shape)}); choose a divisor of {channels}."
                )
            groups = channels // self.group_size
        else:
            groups = self.num_groups
            if groups <= 0 or channels % groups:
                raise ValueError(
                    f"{layer}: num_groups={groups} must be positive and divide the {channels} "
                    f"channels of the input (shape {tuple(x.shape)}); choose a divisor of "
                    f"{channels}, or set group_size instead."
                )
        size = channels // groups
        spatial = red[:-1]
        if spatial:
            # Per-channel (count, mean, M2) over the spatial axes in the natural layout, then
            # Chan's combination across the channels of each group: only the small (N, C)
            # statistics are regrouped, never the activations.
            count, mean, m2 = _stats.synced_moments(
                x, spatial, mask=mask, dtype=self.dtype, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups, layer=layer,
            )
            g = lambda a: jnp.reshape(jnp.broadcast_to(a, mean.shape), mean.shape[:-1] + (groups, size))  # noqa: E731
            count, gmean, gm2 = _stats.combine_moments(g(count), g(mean), g(m2), axis=-1)
        else:
            xg = jnp.reshape(x, x.shape[:-1] + (groups, size))
            mg = None if mask is None else jnp.reshape(_stats.check_mask(mask, x, layer=layer), xg.shape)
            count, gmean, gm2 = _stats.synced_moments(
                xg, (x.ndim,), mask=mg, dtype=self.dtype, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups, layer=layer,
            )
        ginv = lax.rsqrt(gm2 / jnp.maximum(count, 1) + self.epsilon)
        # Back to one value per channel (tiny arrays), broadcast over the spatial axes.
        per_channel = lambda a: _stats.expand(jnp.repeat(a, size, axis=-1), spatial)  # noqa: E731
        return _stats.normalize(
            self, x, per_channel(gmean), per_channel(ginv),
            param_shape=(channels,), param_view=(1,) * (x.ndim - 1) + (channels,), dtype=self.dtype,
            param_dtype=self.param_dtype, use_bias=self.use_bias, use_scale=self.use_scale,
            bias_init=self.bias_init, scale_init=self.scale_init,
        )


class InstanceNorm(_SampleFamily):
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
      track_running_stats: keep running averages of the instance statistics.
      use_running_average: with ``track_running_stats``, normalize with them; may be given
        at call time.
      momentum: decay of the running averages (flax convention).
      (others): as :class:`LayerNorm`.
    """

    feature_axes: Axes = -1
    track_running_stats: bool = False
    use_running_average: bool | None = None
    momentum: float = 0.99

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` per example and channel."""
        layer = type(self).__name__
        feat = _stats.canonicalize_axes(x.ndim, self.feature_axes, argument="feature_axes", layer=layer)
        if 0 in feat:
            raise ValueError(
                f"{layer}: feature_axes={self.feature_axes!r} includes axis 0, which is the "
                "batch axis; name the channel axes only (e.g. -1)."
            )
        red = tuple(i for i in range(1, x.ndim) if i not in feat)
        if not red:
            raise ValueError(
                f"{layer}: an input of shape {tuple(x.shape)} has no axis to normalize over "
                "besides the batch and feature axes; InstanceNorm needs spatial axes."
            )
        if not self.track_running_stats:
            return self._apply(x, mask, red, feat)
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        feature_shape = tuple(x.shape[a] for a in feat)
        ra_mean = _stats.variable_with_shape(
            self, "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), feature_shape,
            what="feature shape",
        )
        ra_var = _stats.variable_with_shape(
            self, "batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), feature_shape,
            what="feature shape",
        )
        if use_ra:
            # Instance statistics have shape (batch, *features); the running ones broadcast.
            mean = jnp.reshape(ra_mean.value, (1,) + feature_shape)
            var = jnp.reshape(ra_var.value, (1,) + feature_shape)
            return self._apply(x, mask, red, feat, stats=(mean, var))
        mean, var = _stats.moments(
            x, red, mask=mask, dtype=self.dtype, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, layer=layer,
        )
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, 0)
            ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, 0)
        return self._apply(x, mask, red, feat, stats=(mean, var))
