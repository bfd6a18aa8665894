"""Batch-statistics family: BatchNorm, BatchRenorm, MeanOnlyBatchNorm."""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers
from jax import lax

from normzoo import _stats

Array = jax.Array
Initializer = Any


class _BatchFamily(nn.Module):
    """Shared fields and machinery of the layers that normalize by batch statistics.

    Subclasses choose how statistics become the affine map ``(mean, inv, offset)``
    in training (:meth:`_train_map`) and at inference (:meth:`_eval_map`).
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    virtual_batch_size: int | None = None

    _tracks_var = True
    # Return the AffineMap instead of applying it (set by IBN's parts; not a dataclass field).
    _return_map = False

    def _validate(self, x: Array) -> None:
        layer = type(self).__name__
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(
                f"{layer}: momentum={self.momentum!r} must lie in [0, 1] (flax convention: "
                "running = momentum * running + (1 - momentum) * batch; PyTorch's 0.1 is 0.9 here)."
            )
        v = self.virtual_batch_size
        if v is not None:
            if not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(
                    f"{layer}: virtual_batch_size={v!r} must be a positive int or None."
                )
            if x.ndim == 0 or x.shape[0] % v:
                raise ValueError(
                    f"{layer}: virtual_batch_size={v} must divide the batch dimension "
                    f"(axis 0) of the input, got shape {tuple(x.shape)}; choose a divisor "
                    f"of {x.shape[0] if x.ndim else 0} or pad the batch."
                )

    def _train_map(self, mean, var, ra_mean, ra_var, steps):
        raise NotImplementedError

    def _eval_map(self, ra_mean, ra_var):
        raise NotImplementedError

    def _extra_state(self):
        """Extra ``batch_stats`` variables (BatchRenorm's step counter)."""
        return None

    def _normalize(self, x: Array, use_running_average: bool | None, mask: Array | None):
        layer = type(self).__name__
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        self._validate(x)
        feature_axes = _stats.canonicalize_axes(x.ndim, self.axis, argument="axis", layer=layer)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        if not reduction_axes:
            raise ValueError(
                f"{layer}: axis={self.axis!r} leaves no axis to compute statistics over "
                f"for an input of shape {tuple(x.shape)}; the feature axes must exclude the batch axis."
            )
        if self.virtual_batch_size is not None and 0 in feature_axes:
            raise ValueError(
                f"{layer}: virtual_batch_size needs axis 0 to be the batch axis, but "
                f"axis={self.axis!r} makes it a feature axis."
            )
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        view = _stats.feature_view(x.ndim, feature_axes, x.shape)
        ra_mean = _stats.variable_with_shape(
            self, "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), feature_shape,
            what="feature shape",
        )
        ra_var = None
        if self._tracks_var:
            ra_var = _stats.variable_with_shape(
                self, "batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), feature_shape,
                what="feature shape",
            )
        steps = self._extra_state()
        affine = dict(
            param_shape=feature_shape, param_view=view, dtype=self.dtype,
            param_dtype=self.param_dtype, use_bias=self.use_bias, use_scale=self.use_scale,
            bias_init=self.bias_init, scale_init=self.scale_init,
        )
        if use_ra:
            mean, inv = self._eval_map(ra_mean.value, None if ra_var is None else ra_var.value)
            amap = _stats.normalize(
                self, x, jnp.reshape(mean, view), jnp.reshape(inv, view), return_map=True, **affine
            )
            return amap if self._return_map else amap(x)

        mask = _stats.check_mask(mask, x, layer=layer)
        # Under `init` the mapped axis need not exist yet (flax does the same).
        axis_name = None if self.is_initializing() else self.axis_name
        v = self.virtual_batch_size
        xs, ms, red = x, mask, reduction_axes
        if v is not None:
            # Ghost batches: a leading axis of x.shape[0] // v groups, stats per group.
            xs = jnp.reshape(x, (x.shape[0] // v, v) + x.shape[1:])
            ms = None if mask is None else jnp.reshape(mask, xs.shape)
            red = tuple(a + 1 for a in reduction_axes)
        mean, var = _stats.moments(
            xs, red, mask=ms, dtype=self.dtype,
            axis_name=None if v is not None else axis_name,
            axis_index_groups=self.axis_index_groups, layer=layer,
        )
        old_mean = ra_mean.value
        old_var = None if ra_var is None else ra_var.value
        if v is not None:
            ghost_view = (xs.shape[0],) + view
            batch_mean, batch_var = jnp.mean(mean, 0), jnp.mean(var, 0)
            if axis_name is not None:
                # Ghost statistics stay local; only the running averages are synced so
                # that every replica keeps identical batch_stats.
                both, member = _stats.gather_all(
                    jnp.stack([batch_mean, batch_var]), axis_name, self.axis_index_groups,
                    layer=layer,
                )
                batch_mean, batch_var = _stats.group_mean(both, member)
            m, inv, offset = self._train_map(
                mean, var, old_mean[None], None if old_var is None else old_var[None], steps
            )
            m, inv = jnp.reshape(m, ghost_view), jnp.reshape(inv, ghost_view)
            offset = None if offset is None else jnp.reshape(offset, ghost_view)
            amap = _stats.normalize(self, xs, m, inv, offset=offset, return_map=True, **affine)
            # One map per ghost batch, repeated for each of its examples.
            per_example = lambda a: None if a is None else jnp.reshape(  # noqa: E731
                jnp.broadcast_to(a, (xs.shape[0], v) + view[1:]), (x.shape[0],) + view[1:])
            amap = amap._replace(
                mean=per_example(amap.mean), mul=per_example(amap.mul), add=per_example(amap.add)
            )
        else:
            batch_mean, batch_var = mean, var
            m, inv, offset = self._train_map(mean, var, old_mean, old_var, steps)
            offset = None if offset is None else jnp.reshape(offset, view)
            amap = _stats.normalize(
                self, x, jnp.reshape(m, view), jnp.reshape(inv, view), offset=offset,
                return_map=True, **affine,
            )
        if not self.is_initializing():
            mom = self.momentum
            ra_mean.value = mom * old_mean + (1.0 - mom) * batch_mean
            if ra_var is not None:
                ra_var.value = mom * old_var + (1.0 - mom) * batch_var
            if steps is not None:
                steps.value = steps.value + 1
        return amap if self._return_map else amap(x)


class BatchNorm(_BatchFamily):
    r"""Batch normalization (Ioffe & Szegedy 2015, arXiv:1502.03167); drop-in for ``flax.linen.BatchNorm``.

    In training, with ``\mu_B`` and ``\sigma_B^2`` the mean and (biased) variance of the
    batch over every axis except ``axis``:

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    and the running statistics are updated as ``r = momentum * r + (1 - momentum) * b``.
    With ``use_running_average=True`` the running statistics replace the batch ones.

    Fields, defaults and variables (``params/{scale,bias}``, ``batch_stats/{mean,var}``) are
    flax.linen's, so ``nn.BatchNorm`` and ``normzoo.BatchNorm`` read each other's variables.
    Differences: the variance is always computed stably (shifted sums, or on CPU the fast
    sums checked and redone shifted when a mean exceeds 4 standard deviations; flax's default
    ``E[x^2] - E[x]^2`` returns garbage for float32 inputs with ``|mean| >> std``);
    ``use_fast_variance`` is accepted for compatibility and has no effect. With
    ``axis_name`` the statistics are combined across devices with one ``psum`` that
    hands every device all per-device ``(count, mean, M2)`` triples, and
    Chan's formula; this is stable, count-weighted (correct under masks and uneven
    batches) and works with ``axis_index_groups`` under ``shard_map``. Under ``jit``
    with a batch sharded by ``NamedSharding`` leave ``axis_name=None``: the compiler
    reduces across devices itself.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) + 1e4
      >>> bn = normzoo.BatchNorm(use_running_average=False)
      >>> variables = bn.init(jax.random.key(1), x)
      >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
      >>> round(float(y.std()), 3), updates['batch_stats']['mean'].shape
      (1.0, (3,))

    Attributes:
      use_running_average: if True, normalize with the running statistics (inference);
        may also be given at call time.
      axis: the feature axis (or axes); statistics are taken over all others.
      momentum: decay of the running averages.
      epsilon: added to the variance.
      dtype: dtype of the result (default: promote input and params, as flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias ``beta``.
      use_scale: learn a scale ``gamma``.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: mapped axis (pmap / shard_map) to synchronize statistics over.
      axis_index_groups: partition of ``axis_name`` into groups synchronized separately.
      use_fast_variance: accepted for flax compatibility; ignored (always stable).
      virtual_batch_size: ghost batch size: statistics are computed over consecutive
        sub-batches of this many examples of each device's batch (Hoffer et al. 2017);
        the running statistics are updated with their average.
    """

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x``; ``mask`` (boolean, broadcastable) selects what enters the statistics."""
        return self._normalize(x, use_running_average, mask)

    def _train_map(self, mean, var, ra_mean, ra_var, steps):
        return mean, lax.rsqrt(var + self.epsilon), None

    def _eval_map(self, ra_mean, ra_var):
        return ra_mean, lax.rsqrt(ra_var + self.epsilon)


class BatchRenorm(_BatchFamily):
    r"""Batch renormalization (Ioffe 2017, arXiv:1702.03275).

    In training, with batch statistics ``\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}`` and
    running statistics ``\mu, \sigma = \sqrt{\mathrm{var} + \epsilon}``:

    .. math::
        r = \mathrm{sg}\big(\mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max})\big),\quad
        d = \mathrm{sg}\big(\mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max})\big)

    .. math:: y = \gamma \Big(\frac{x - \mu_B}{\sigma_B} r + d\Big) + \beta

    where ``sg`` stops gradients. At inference the running statistics are used, as in
    BatchNorm. Following the paper, the clipping bounds start at ``r_max = 1, d_max = 0``
    (plain BatchNorm) and relax linearly to the configured values over ``warmup_steps``
    training steps, counted in ``batch_stats['steps']``. With ``r_max=1, d_max=0`` this
    layer equals :class:`BatchNorm`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> layer = normzoo.BatchRenorm(r_max=3.0, d_max=5.0, warmup_steps=100)
      >>> variables = layer.init(jax.random.key(1), x, use_running_average=False)
      >>> y, upd = layer.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
      >>> int(upd['batch_stats']['steps'])
      1

    Attributes:
      r_max: upper clip of ``r`` (>= 1); the lower clip is ``1 / r_max``.
      d_max: clip of ``|d|`` (>= 0).
      warmup_steps: steps over which the bounds relax from (1, 0) to (r_max, d_max);
        0 applies the targets from the first step.
      (all other fields): as :class:`BatchNorm`.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5000

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Renormalizes ``x``; ``mask`` (boolean, broadcastable) selects what enters the statistics."""
        return self._normalize(x, use_running_average, mask)

    def _validate(self, x):
        super()._validate(x)
        if not self.r_max >= 1.0:
            raise ValueError(
                f"BatchRenorm: r_max={self.r_max!r} must be >= 1 (r is clipped to "
                "[1/r_max, r_max]); use r_max=1 for plain BatchNorm."
            )
        if not self.d_max >= 0.0:
            raise ValueError(
                f"BatchRenorm: d_max={self.d_max!r} must be >= 0 (d is clipped to "
                "[-d_max, d_max]); use d_max=0 for plain BatchNorm."
            )
        if not isinstance(self.warmup_steps, numbers.Integral) or self.warmup_steps < 0:
            raise ValueError(
                f"BatchRenorm: warmup_steps={self.warmup_steps!r} must be an int >= 0."
            )

    def _extra_state(self):
        return self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))

    def _train_map(self, mean, var, ra_mean, ra_var, steps):
        if self.warmup_steps > 0:
            t = jnp.minimum(steps.value.astype(jnp.float32) / self.warmup_steps, 1.0)
        else:
            t = 1.0
        r_max = 1.0 + (self.r_max - 1.0) * t
        d_max = self.d_max * t
        inv_batch = lax.rsqrt(var + self.epsilon)
        inv_run = lax.rsqrt(ra_var + self.epsilon)
        r = lax.stop_gradient(jnp.clip((inv_run / inv_batch), 1.0 / r_max, r_max))
        d = lax.stop_gradient(jnp.clip((mean - ra_mean) * inv_run, -d_max, d_max))
        return mean, inv_batch * r, d

    def _eval_map(self, ra_mean, ra_var):
        return ra_mean, lax.rsqrt(ra_var + self.epsilon)


class MeanOnlyBatchNorm(_BatchFamily):
    r"""Mean-only batch normalization (Salimans & Kingma 2016, arXiv:1602.07868, sec. 3.2).

    Subtracts the batch mean (running mean at inference) and adds a learned bias; no
    division by the standard deviation. The WeightNorm paper pairs it with weight-normalized
    layers: the weight norm fixes the scale, the mean-only BatchNorm centres activations.

    .. math:: y = x - \mu_B + \beta

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jnp.arange(6.0).reshape(3, 2)
      >>> y, _ = normzoo.MeanOnlyBatchNorm(use_running_average=False).init_with_output(
      ...     jax.random.key(0), x)
      >>> y.tolist()
      [[-2.0, -2.0], [0.0, 0.0], [2.0, 2.0]]

    Attributes:
      As :class:`BatchNorm`; ``use_scale`` is False and only ``batch_stats/mean`` is kept.
    """

    use_scale: bool = False
    _tracks_var = False

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Centres ``x``; ``mask`` (boolean, broadcastable) selects what enters the statistics."""
        return self._normalize(x, use_running_average, mask)

    def _train_map(self, mean, var, ra_mean, ra_var, steps):
        return mean, jnp.ones_like(mean), None

    def _eval_map(self, ra_mean, ra_var):
        return ra_mean, jnp.ones_like(ra_mean)
