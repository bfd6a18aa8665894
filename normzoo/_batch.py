"""Batch-statistics family: BatchNorm, BatchRenorm, MeanOnlyBatchNorm.

Each layer's ``affine_map`` reads top to bottom: validate, variables, statistics, map,
update. ``__call__`` applies that map to ``x``; IBN and deployment code call
``affine_map`` for the map itself.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers
from jax import lax

from normzoo import _stats
from normzoo._stats import AffineMap, RunningStats

Array = jax.Array
Initializer = Any


class _Layout(NamedTuple):
    """Static facts about one input: how statistics are taken and broadcast back."""

    reduce: tuple[int, ...]  # axes the statistics reduce (of the ghost view, if any)
    shape: tuple[int, ...]  # feature shape: the variables' shape
    view: tuple[int, ...]  # per-feature arrays reshaped to broadcast against x
    ghosts: int | None  # number of ghost batches (virtual_batch_size), or None
    batch: int  # size of axis 0

    def ghost_view(self, a: Array | None) -> Array | None:
        """Reshape in: x (or its mask) with a leading axis of ghost batches."""
        if a is None or self.ghosts is None:
            return a
        return jnp.reshape(a, (self.ghosts, a.shape[0] // self.ghosts) + a.shape[1:])

    def expand(self, stat: Array) -> Array:
        """Reshape out: per-feature (or per-ghost-batch) statistics broadcast against x."""
        if jnp.ndim(stat) == len(self.shape):  # one per feature
            return jnp.reshape(stat, self.view)
        per_ghost = jnp.reshape(stat, (self.ghosts, 1) + self.view[1:])
        repeated = jnp.broadcast_to(per_ghost, (self.ghosts, self.batch // self.ghosts) + self.view[1:])
        return jnp.reshape(repeated, (self.batch,) + self.view[1:])


def _layout(mdl: nn.Module, x: Array) -> _Layout:
    """Validates ``axis`` and ``virtual_batch_size`` against ``x``."""
    layer = type(mdl).__name__
    features = _stats.canonicalize_axes(x.ndim, mdl.axis, argument="axis", layer=layer)
    reduce = tuple(i for i in range(x.ndim) if i not in features)
    v, ghosts = mdl.virtual_batch_size, None
    if v is not None:
        if not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{layer}: virtual_batch_size={v!r} must be a positive int or None.")
        if 0 in features:
            raise ValueError(
                f"{layer}: virtual_batch_size needs axis 0 to be the batch axis, but "
                f"axis={mdl.axis!r} makes it a feature axis."
            )
        if x.shape[0] % v:
            raise ValueError(
                f"{layer}: virtual_batch_size={v} must divide the batch dimension "
                f"(axis 0) of the input, got shape {tuple(x.shape)}; choose a divisor "
                f"of {x.shape[0]} or pad the batch."
            )
        ghosts, reduce = x.shape[0] // v, tuple(a + 1 for a in reduce)
    shape = tuple(x.shape[a] for a in features)
    view = _stats.feature_view(x.ndim, features, x.shape)
    return _Layout(reduce, shape, view, ghosts, x.shape[0] if x.ndim else 1)


def _batch_moments(mdl: nn.Module, x: Array, layout: _Layout, mask: Array | None):
    """Statistics of a training step: ``(mean, var)`` for the map (one per ghost batch with
    ``virtual_batch_size``) and ``(mean, var, valid)`` for the running averages.

    With ghost batches the running averages take the average over the ghost batches (and,
    with ``axis_name``, over the devices) that hold any valid element; ``valid`` is False
    for a feature no valid element reached, whose running statistics then stay as they were.
    """
    layer = type(mdl).__name__
    mask = _stats.check_mask(mask, x, layer=layer)
    # Under `init` the mapped axis need not exist yet (flax does the same).
    axis_name = None if mdl.is_initializing() else mdl.axis_name
    if layout.ghosts is None:
        count, mean, m2 = _stats.synced_moments(
            x, layout.reduce, mask=mask, dtype=mdl.dtype, axis_name=axis_name,
            axis_index_groups=mdl.axis_index_groups, layer=layer,
        )
        var = m2 / jnp.maximum(count, 1)
        return (mean, var), (mean, var, count > 0)
    # Ghost statistics stay on each device; only their averages, which feed the running
    # statistics, are averaged across devices, so every replica keeps the same batch_stats.
    count, mean, m2 = _stats.synced_moments(
        layout.ghost_view(x), layout.reduce, mask=layout.ghost_view(mask), dtype=mdl.dtype,
        layer=layer,
    )
    var = m2 / jnp.maximum(count, 1)
    avg_mean, avg_var, n = _average_where(count > 0, mean, var)
    if axis_name is not None:
        parts = [avg_mean, avg_var.astype(avg_mean.dtype), (n > 0).astype(avg_mean.dtype)]
        stacked, member = _stats.gather_all(jnp.stack(parts), axis_name, mdl.axis_index_groups, layer=layer)
        has = jnp.real(stacked[:, 2]) > 0
        if member is not None:
            has = jnp.logical_and(has, jnp.reshape(member, (-1,) + (1,) * (has.ndim - 1)))
        avg_mean, avg_var, n = _average_where(has, stacked[:, 0], stacked[:, 1])
    return (mean, var), (avg_mean, jnp.real(avg_var), n > 0)


def _average_where(valid: Array, mean: Array, var: Array):
    """Averages over the leading axis of the entries where ``valid``; and how many there were."""
    n = jnp.sum(valid, 0)
    avg = lambda a: jnp.sum(jnp.where(valid, a, 0), 0) / jnp.maximum(n, 1)  # noqa: E731
    return avg(mean), avg(var), n


class _Mapped(nn.Module):
    """The two public methods of every batch-statistics layer, both applying the layer's
    nowrap ``_map(x, use_running_average, mask) -> AffineMap``."""

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x``.

        Args:
          x: the input.
          use_running_average: if True, normalize with the running statistics; may be
            given here or at construction, not both.
          mask: boolean, broadcastable to ``x``; only True positions enter the statistics
            (every position is normalized).

        Returns:
          The normalized input, of x's shape.
        """
        return self._map(x, use_running_average, mask)(x)

    @nn.compact
    def affine_map(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> AffineMap:
        """The map ``y = (x - mean) * mul + add`` that ``__call__`` applies to ``x``.

        Same arguments, variables and running-statistics update as ``__call__``, which is
        ``affine_map(x, ...)(x)``. At inference the map is per channel: ``mul`` and
        ``add - mean * mul`` are the scale and shift to fold into a preceding linear layer.
        Layers built from this one (IBN) join maps and apply them in one pass.
        """
        return self._map(x, use_running_average, mask)


class _BatchFields(_Mapped):
    """flax.linen.BatchNorm's fields in flax's order with flax's defaults, then ours
    (keyword-only); ``__call__`` and ``affine_map`` from :class:`_Mapped`."""

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
    force_float32_reductions: bool = True
    virtual_batch_size: int | None = dataclasses.field(default=None, kw_only=True)

    @nn.nowrap
    def _nominal_dtype(self, x: Array) -> Any:
        return _stats.nominal_dtype(x.dtype, self.dtype, self.force_float32_reductions)

    @nn.nowrap
    def _running_dtype(self) -> Any:
        return jnp.float32 if self.force_float32_reductions else self.param_dtype

    @nn.nowrap
    def _params(self, layout: _Layout):
        return _stats.affine_params(
            self, layout.shape, layout.view, use_scale=self.use_scale, use_bias=self.use_bias,
            scale_init=self.scale_init, bias_init=self.bias_init, param_dtype=self.param_dtype,
            force_float32_reductions=self.force_float32_reductions,
        )


class BatchNorm(_BatchFields):
    r"""Batch normalization (Ioffe & Szegedy 2015, arXiv:1502.03167); drop-in for ``flax.linen.BatchNorm``.

    In training, with ``\mu_B`` and ``\sigma_B^2`` the mean and (biased) variance of the
    batch over every axis except ``axis``:

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    and the running statistics are updated as ``r = momentum * r + (1 - momentum) * b``.
    With ``use_running_average=True`` the running statistics replace the batch ones.

    Fields (order, defaults), call arguments and variables (``params/{scale,bias}``,
    ``batch_stats/{mean,var}``) are flax.linen's, so ``nn.BatchNorm`` and
    ``normzoo.BatchNorm`` take the same arguments and read each other's variables.
    Differences: the variance is always computed stably, so ``use_fast_variance`` is
    accepted and has no effect (flax's default ``E[x^2] - E[x]^2`` returns garbage for
    float32 inputs with ``|mean| >> std``); statistics are always reduced in at least
    float32, so ``force_float32_reductions=False`` keeps only its effect on the variables'
    dtypes (running statistics in ``param_dtype``). With ``axis_name`` the statistics are
    combined across devices with one ``psum`` that hands every device all per-device
    ``(count, mean, M2)`` triples, and Chan's formula; this is stable, count-weighted
    (correct under masks and uneven batches) and works with ``axis_index_groups`` under
    ``shard_map``. Under ``jit`` with a batch sharded by ``NamedSharding`` leave
    ``axis_name=None``: the compiler reduces across devices itself.

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
      axis: the feature axis (or axes); statistics are taken over all others (none left is
        allowed, as in flax: e.g. per example under ``jax.vmap`` with ``axis_name``).
      momentum: decay of the running averages.
      epsilon: added to the variance.
      dtype: dtype of the result (default: promote input and params, as flax).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn a bias ``beta``.
      use_scale: learn a scale ``gamma``.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: mapped axis (pmap / shard_map / vmap) to synchronize statistics over.
      axis_index_groups: partition of ``axis_name`` into groups synchronized separately.
      use_fast_variance: accepted for flax compatibility; ignored (always stable).
      force_float32_reductions: as flax: if False the running statistics are kept in
        ``param_dtype``; the statistics themselves are still reduced in float32.
      virtual_batch_size: (keyword-only) ghost batch size: statistics are computed over
        consecutive sub-batches of this many examples of each device's batch (Hoffer et
        al. 2017); the running statistics are updated with their average.
    """

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        layout = _layout(self, x)
        running = RunningStats.create(self, layout.shape, momentum=self.momentum, dtype=self._running_dtype())
        scale, bias = self._params(layout)
        if use_ra:
            mean, var = running.mean.value, running.var.value
        else:
            (mean, var), batch = self._moments(x, layout, mask)
            running.update(self, batch, self._nominal_dtype(x))
        return AffineMap.normalizing(
            x, layout.expand(mean), layout.expand(lax.rsqrt(var + self.epsilon)),
            scale=scale, bias=bias, dtype=self.dtype,
        )

    @nn.nowrap
    def _moments(self, x: Array, layout: _Layout, mask: Array | None):
        # The batch's mean and spread; LpBatchNorm measures the spread differently.
        return _batch_moments(self, x, layout, mask)


class BatchRenorm(_BatchFields):
    r"""Batch renormalization (Ioffe 2017, arXiv:1702.03275).

    In training, with batch statistics ``\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}`` and
    running statistics ``\mu, \sigma = \sqrt{\mathrm{var} + \epsilon}``:

    .. math::
        r = \mathrm{sg}\big(\mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max})\big),\quad
        d = \mathrm{sg}\big(\mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max})\big)

    .. math:: y = \gamma \Big(\frac{x - \mu_B}{\sigma_B} r + d\Big) + \beta

    where ``sg`` stops gradients (for complex inputs ``d`` is clipped in magnitude,
    ``|d| <= d_max``). At inference the running statistics are used, as in
    BatchNorm. The clipping bounds start at ``r_max = 1, d_max = 0`` (plain BatchNorm) and
    reach the configured values after ``warmup_steps`` training steps, counted in
    ``batch_stats['steps']``: linearly, as in the paper (``warmup_schedule="linear"``), or
    all at once when the count reaches ``warmup_steps`` (``"step"``, CrossQ's and sbx's
    schedule; :class:`normzoo.sbx.BatchRenorm` is their whole layer). With ``r_max=1,
    d_max=0`` this layer equals :class:`BatchNorm`.

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
      r_max: (keyword-only) upper clip of ``r`` (>= 1); the lower clip is ``1 / r_max``.
      d_max: (keyword-only) clip of ``|d|`` (>= 0).
      warmup_steps: (keyword-only) steps over which the bounds relax from (1, 0) to
        (r_max, d_max); 0 applies the targets from the first step.
      warmup_schedule: (keyword-only) ``"linear"`` (the paper: bounds relax linearly over
        ``warmup_steps``) or ``"step"`` (plain BatchNorm while fewer than ``warmup_steps``
        steps were taken, then the full bounds: CrossQ / sbx).
      (all other fields): as :class:`BatchNorm`, in the same order.
    """

    r_max: float = dataclasses.field(default=3.0, kw_only=True)
    d_max: float = dataclasses.field(default=5.0, kw_only=True)
    warmup_steps: int = dataclasses.field(default=5000, kw_only=True)
    warmup_schedule: str = dataclasses.field(default="linear", kw_only=True)

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        self._check_bounds()
        layout = _layout(self, x)
        running = RunningStats.create(self, layout.shape, momentum=self.momentum, dtype=self._running_dtype())
        steps = self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))
        scale, bias = self._params(layout)
        if use_ra:
            mean, inv, d = running.mean.value, lax.rsqrt(running.var.value + self.epsilon), None
        else:
            (mean, var), batch = _batch_moments(self, x, layout, mask)
            inv_batch = lax.rsqrt(var + self.epsilon)
            r, d = self._correction(mean, inv_batch, running, steps.value)
            inv = inv_batch * r
            running.update(self, batch, self._nominal_dtype(x))
            if not self.is_initializing():
                steps.value = steps.value + 1
        return AffineMap.normalizing(
            x, layout.expand(mean), layout.expand(inv), scale=scale, bias=bias,
            offset=None if d is None else layout.expand(d), dtype=self.dtype,
        )

    @nn.nowrap
    def _check_bounds(self) -> None:
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
        if self.warmup_schedule not in _SCHEDULES:
            raise ValueError(
                f"BatchRenorm: warmup_schedule={self.warmup_schedule!r} is not one of "
                f"{sorted(_SCHEDULES)}; use 'linear' (the paper) or 'step' (CrossQ / sbx)."
            )

    @nn.nowrap
    def _correction(self, mean, inv_batch, running, steps):
        """The paper's ``r`` and ``d`` against the running statistics before this step
        (none under ``init``, which has no running statistics yet: plain BatchNorm there)."""
        t = 0.0 if self.is_initializing() else _SCHEDULES[self.warmup_schedule](steps, self.warmup_steps)
        r_max, d_max = 1.0 + (self.r_max - 1.0) * t, self.d_max * t
        return renorm_correction(mean, inv_batch, running, self.epsilon, r_max, d_max)


# The share of the way from the bounds (1, 0) to (r_max, d_max) after `steps` of `warmup`.
_SCHEDULES = {
    "linear": lambda steps, warmup: 1.0 if warmup == 0 else jnp.minimum(steps.astype(jnp.float32) / warmup, 1.0),
    "step": lambda steps, warmup: (steps >= warmup).astype(jnp.float32),
}


def renorm_correction(mean, inv_batch, running: RunningStats, epsilon, r_max, d_max):
    """BatchRenorm's ``(r, d)``, gradients stopped: ``r = clip(sigma_B / sigma, 1/r_max, r_max)``,
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` against the running statistics ``mu,
    sigma`` before this step (``sigma_B = 1 / inv_batch``)."""
    inv_run = lax.rsqrt(running.var.value + epsilon)
    r = jnp.clip(inv_run / inv_batch, 1.0 / r_max, r_max)
    d = (mean - running.mean.value) * inv_run
    # Clipped in magnitude: clip(d, -d_max, d_max) for real d, and the same bound on |d|
    # for complex inputs, whose d has no order.
    size = jnp.abs(d)
    d = jnp.where(size > d_max, d * (d_max / jnp.maximum(size, jnp.finfo(size.dtype).tiny)), d)
    return lax.stop_gradient(r), lax.stop_gradient(d)


class MeanOnlyBatchNorm(_BatchFields):
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
      As :class:`BatchNorm`; ``use_scale`` defaults to False and only ``batch_stats/mean``
      is kept.
    """

    use_scale: bool = False

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        layout = _layout(self, x)
        running = RunningStats.create(
            self, layout.shape, momentum=self.momentum, dtype=self._running_dtype(), track_var=False
        )
        scale, bias = self._params(layout)
        if use_ra:
            mean = running.mean.value
        else:
            (mean, _), batch = _batch_moments(self, x, layout, mask)
            running.update(self, batch, self._nominal_dtype(x))
        mean = layout.expand(mean)
        return AffineMap.normalizing(
            x, mean, jnp.ones(mean.shape, jnp.real(mean).dtype), scale=scale, bias=bias, dtype=self.dtype
        )



class NoisyBatchNorm(BatchNorm):
    r"""BatchNorm followed by noise that shifts every activation's distribution at every step
    ("noisy" BatchNorm of Santurkar et al. 2018, arXiv:1805.11604, sec. 2.1).

    In training each feature ``j`` (channel) draws, at every call, the parameters of its
    noise, ``\mu_j \sim U(-\mathrm{shift\_range}, \mathrm{shift\_range})`` and ``\sigma_j \sim
    U(\mathrm{scale\_range})``; then every activation ``i`` (example and position) of that
    feature draws a scale and a shift around them:

    .. math::
        s_{ij} \sim \mathcal{N}(\sigma_j, w^2), \quad m_{ij} \sim U(\mu_j - w, \mu_j + w), \quad
        y_{ij} = s_{ij}\, \mathrm{BN}(x)_{ij} + m_{ij}

    with ``w = noise_width`` and ``BN`` :class:`BatchNorm` (its scale and bias included). The
    distribution of each activation is thus non-zero-mean, non-unit-variance and different at
    every step: a deliberate covariate shift, which the paper shows BatchNorm networks train
    through. The defaults (0.5, (1, 1.25), 0.1) are the paper's appendix constants. Keys come
    from the Flax rng stream ``rng_collection`` (``"noise"``): ``model.apply(...,
    rngs={"noise": key})``. The noise is not drawn with ``use_running_average=True``
    (inference is BatchNorm's) nor by ``init``; the running statistics are those of the input,
    before the noise.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (512, 4))
      >>> layer = normzoo.NoisyBatchNorm(use_running_average=False)
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y, _ = layer.apply(variables, x, rngs={"noise": jax.random.key(2)}, mutable=["batch_stats"])
      >>> bool(jnp.any(jnp.abs(y.mean(0)) > 0.05))  # shifted on purpose
      True

    Attributes:
      shift_range: (keyword-only) ``\mu_j`` is drawn from ``U(-shift_range, shift_range)``.
      scale_range: (keyword-only) ``(low, high)``: ``\sigma_j`` is drawn from ``U(low, high)``.
      noise_width: (keyword-only) ``w``: the standard deviation of ``s_{ij}`` and the
        half-width of ``m_{ij}``'s interval.
      rng_collection: (keyword-only) the rng stream of the noise (as ``flax.linen.Dropout``).
      (all other fields): as :class:`BatchNorm`, in the same order.
    """

    shift_range: float = dataclasses.field(default=0.5, kw_only=True)
    scale_range: tuple[float, float] = dataclasses.field(default=(1.0, 1.25), kw_only=True)
    noise_width: float = dataclasses.field(default=0.1, kw_only=True)
    rng_collection: str = dataclasses.field(default="noise", kw_only=True)

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        amap = BatchNorm._map(self, x, use_running_average, mask)
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if use_ra or self.is_initializing():
            return amap
        low, high = self._check_noise()
        layout = _layout(self, x)
        k_mu, k_sigma, k_scale, k_shift = jax.random.split(self.make_rng(self.rng_collection), 4)
        real = jnp.real(amap.mul).dtype
        mu = jnp.reshape(jax.random.uniform(k_mu, layout.shape, real, -self.shift_range, self.shift_range), layout.view)
        sigma = jnp.reshape(jax.random.uniform(k_sigma, layout.shape, real, low, high), layout.view)
        w = self.noise_width
        scale = sigma + w * jax.random.normal(k_scale, x.shape, real)
        shift = mu + jax.random.uniform(k_shift, x.shape, real, -w, w)
        return amap.then(scale, shift)

    @nn.nowrap
    def _check_noise(self) -> tuple[float, float]:
        try:
            low, high = (float(v) for v in self.scale_range)
        except (TypeError, ValueError):
            low = high = math.nan
        if not low <= high:
            raise ValueError(
                f"NoisyBatchNorm: scale_range={self.scale_range!r} must be a pair (low, high) with "
                "low <= high, e.g. (1.0, 1.25)."
            )
        for name in ("shift_range", "noise_width"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"NoisyBatchNorm: {name}={getattr(self, name)!r} must be >= 0.")
        return low, high

# Each Lp deviation times this constant is the standard deviation for Gaussian data:
# E|x - mu| = sigma * sqrt(2 / pi). The maximum has no such constant (it grows with the
# batch, like sigma * sqrt(2 ln n)); it is used as it is.
_LP_SCALE = {1: math.sqrt(math.pi / 2), 2: 1.0, math.inf: 1.0}


class LpBatchNorm(BatchNorm):
    r"""Batch normalization by the batch's Lp deviation (Santurkar et al. 2018, arXiv:1805.11604, sec. 3.3).

    Centred by the batch mean ``\mu_B`` and divided by a deviation ``s_p`` of the batch
    (over every axis except ``axis``):

    .. math::
        s_1 = \sqrt{\pi/2}\; \mathrm{E}\,|x - \mu_B|, \qquad
        s_2 = \sqrt{\mathrm{E}\,|x - \mu_B|^2}, \qquad
        s_\infty = \max |x - \mu_B|

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{s_p^2 + \epsilon}} + \beta

    ``s_1`` is scaled so that it equals the standard deviation for Gaussian data; ``s_2`` is
    the standard deviation (``p=2`` is :class:`BatchNorm`); ``s_\infty`` is the largest
    deviation, unscaled, so L∞ outputs lie in [-1, 1] before ``scale`` and ``bias``. The
    running averages keep ``batch_stats/mean`` and ``batch_stats/var = s_p^2`` (BatchNorm's
    variables and update rule), and inference uses them as BatchNorm does, so the layer
    folds, converts and checkpoints like BatchNorm.

    With ``axis_name`` the statistics are those of the union of the devices' batches (masks
    count-weighted): ``p=2`` and ``p=inf`` with one collective (each device's count, mean,
    M2, maximum and minimum: ``s_\infty = \max(\max x - \mu, \mu - \min x)``); ``p=1`` needs
    two, because the mean absolute deviation about the global mean cannot be assembled from
    per-device summaries: the first gives the mean, the second the absolute deviations.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (256, 3)) * 2.0 + 1e4
      >>> layer = normzoo.LpBatchNorm(p=1, use_running_average=False)
      >>> y, updates = layer.init_with_output(jax.random.key(1), x)
      >>> bool(abs(float(y.std()) - 1.0) < 0.1), float(abs(y).max() < 5)
      (True, 1.0)

    Attributes:
      p: (keyword-only) 1, 2 or ``math.inf`` (also accepted: the string ``"inf"``).
      (all other fields): as :class:`BatchNorm`, in the same order. ``virtual_batch_size``
        needs ``p=2``; complex inputs too.
    """

    p: float | str = dataclasses.field(default=2, kw_only=True)

    @nn.nowrap
    def _order(self) -> float:
        p = math.inf if self.p in ("inf", "Inf") else self.p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or p not in _LP_SCALE:
            raise ValueError(
                f"LpBatchNorm: p={self.p!r} must be 1, 2 or math.inf ('inf'): the L1 (mean "
                "absolute deviation), L2 (standard deviation) or L-infinity (maximum) deviation."
            )
        return p

    @nn.nowrap
    def _moments(self, x: Array, layout: _Layout, mask: Array | None):
        p = self._order()
        if p == 2:
            return _batch_moments(self, x, layout, mask)
        if layout.ghosts is not None:
            raise ValueError(
                f"LpBatchNorm: virtual_batch_size={self.virtual_batch_size!r} needs p=2, got p={self.p!r}; "
                "leave virtual_batch_size=None for the L1 and L-infinity deviations."
            )
        if jnp.iscomplexobj(x):
            raise TypeError(
                f"LpBatchNorm: a complex input (dtype {x.dtype}) needs p=2, got p={self.p!r}; the "
                "L1 and L-infinity deviations are defined here for real inputs only."
            )
        dev, (count, mean) = _lp_deviation(self, x, layout.reduce, mask, p)
        var = jnp.square(dev * _LP_SCALE[p])
        return (mean, var), (mean, var, count > 0)


def _lp_deviation(mdl: LpBatchNorm, x: Array, axes: tuple[int, ...], mask: Array | None, p: float):
    """``(s, (count, mean))``: the L1 mean absolute deviation or the L∞ maximum deviation about
    the batch mean, over ``axes`` and across ``axis_name``; 0 where no element is valid."""
    layer = type(mdl).__name__
    mask = _stats.check_mask(mask, x, layer=layer)
    axis_name = None if mdl.is_initializing() else mdl.axis_name
    groups = mdl.axis_index_groups
    x = jnp.asarray(x, _stats.stats_dtype(x.dtype, mdl.dtype))
    if p == 1:  # the mean of the union (first collective), then the deviations about it (second)
        count, mean, _ = _stats.synced_moments(x, axes, mask=mask, axis_name=axis_name,
                                                axis_index_groups=groups, layer=layer)
        spread = jnp.abs(x - jnp.expand_dims(mean, axes))
        _, dev, _ = _stats.synced_moments(spread, axes, mask=mask, axis_name=axis_name,
                                          axis_index_groups=groups, layer=layer)
        return dev, (count, mean)
    count, mean, m2 = _stats.local_moments(x, axes, mask, True)
    valid = jnp.ones(x.shape, bool) if mask is None else mask
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), axes)
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axes)
    if axis_name is not None:  # one collective: every device's count, mean, M2, max and min
        stacked, member = _stats.gather_all(jnp.stack([count, mean, m2, hi, lo]), axis_name, groups, layer=layer)
        n_i = stacked[:, 0]
        if member is not None:
            n_i = jnp.where(jnp.reshape(member, (-1,) + (1,) * (n_i.ndim - 1)), n_i, 0)
        count, mean, _ = _stats.combine_moments(n_i, stacked[:, 1], jnp.where(n_i > 0, stacked[:, 2], 0))
        hi = jnp.max(jnp.where(n_i > 0, stacked[:, 3], -jnp.inf), 0)
        lo = jnp.min(jnp.where(n_i > 0, stacked[:, 4], jnp.inf), 0)
    dev = jnp.maximum(hi - mean, mean - lo)
    return jnp.where(count > 0, dev, 0.0), (count, mean)
