r"""Every normalizer as a pure function of arrays: ``from normzoo import functional as F``.

What ``torch.nn.functional`` is to ``torch.nn``: the maths without the module. Inputs,
parameters and running statistics go in; the output (and, for layers that keep running
statistics, the new running statistics) come out. Nothing here creates or reads a variable,
so these functions work the same from plain JAX, Equinox, Haiku or anything else, under
``jax.jit``, ``jax.grad``, ``jax.vmap`` (with ``axis_name``), ``jax.shard_map`` and ``jax.pmap``.
normzoo's flax.linen and flax.nnx layers are thin shells over them: they hold the variables
and call these functions.

Conventions (flax's names, torch's argument order where it fits):

* ``x`` first, then the running statistics ``mean``, ``var`` (where the layer keeps them),
  then the affine parameters ``scale`` (gamma) and ``bias`` (beta); any of the affine
  parameters may be None (absent). Each has the shape of the features: ``x``'s sizes along
  ``axis`` / ``feature_axes``; anything else is a ``ValueError`` naming it.
* Layers with running statistics take ``training`` (keyword, required): True normalizes by
  the batch's statistics and returns the running statistics moved toward them
  (``momentum * running + (1 - momentum) * batch``, flax's convention: PyTorch's 0.1 is
  0.9 here); False normalizes by the running statistics and returns them unchanged. They
  return ``(y, stats)``, a :class:`BatchStats` (or :class:`RenormStats`); the others return ``y``.
  New running statistics carry no gradient (they are state) and have the running statistics'
  dtype promoted with that of the statistics (at least float32, as flax): keep them in float32
  (a ``lax.scan`` carry of bfloat16 statistics would change type).
* Statistics are computed stably (no catastrophic cancellation for inputs with large means)
  in at least float32 whatever the input dtype; complex inputs have a complex mean and the real
  variance ``E|x - mean|^2``. ``mask`` (boolean, broadcastable to ``x``) selects the elements
  that enter the statistics; a feature that no element reaches is normalized by the neutral
  statistics (mean 0, variance 1): the affine part alone. ``axis_name`` combines statistics
  across a mapped axis (``pmap``, ``shard_map``, ``vmap``) with one collective, weighting
  every device by its number of valid elements; under ``jit`` with a batch sharded by
  ``NamedSharding`` leave it None.
* The output dtype is ``dtype`` if given, else the promotion of ``x`` and the affine
  parameters (flax.linen's rule).

Example, a BatchNorm training step in plain JAX:

  >>> import jax, jax.numpy as jnp
  >>> from normzoo import functional as F
  >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3 + 1e4
  >>> mean, var = jnp.zeros(4), jnp.ones(4)
  >>> y, (mean, var) = F.batch_norm(x, mean, var, training=True, momentum=0.9)
  >>> round(float(y.std()), 3), [round(float(m)) for m in mean]
  (1.0, [1000, 1000, 1000, 1000])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from jax import lax

from normzoo import _stats
from normzoo._stats import AffineMap, moments, sync_batch_stats

Array = jax.Array
Axes = int | Sequence[int]

__all__ = [
    "BatchStats",
    "RenormStats",
    "SpectralNormOut",
    "WhiteningStats",
    "batch_norm",
    "batch_renorm",
    "conv",
    "conv_spectral_norm",
    "cosine_conv",
    "cosine_dense",
    "evonorm_b0",
    "evonorm_s0",
    "filter_response_norm",
    "frozen_batch_norm",
    "global_response_norm",
    "group_norm",
    "ibn",
    "instance_norm",
    "iter_norm",
    "layer_norm",
    "lp_batch_norm",
    "mean_only_batch_norm",
    "moments",
    "newton_schulz_whitening",
    "noisy_batch_norm",
    "rms_norm",
    "spectral_norm",
    "sync_batch_stats",
    "tracked_instance_norm",
    "weight_norm",
    "weight_standardize",
]


class BatchStats(NamedTuple):
    """Running statistics: ``mean`` and ``var`` (None where a layer keeps no variance)."""

    mean: Array | None
    var: Array | None


class RenormStats(NamedTuple):
    """BatchRenorm's running statistics and its step counter (int32)."""

    mean: Array
    var: Array
    steps: Array


# ============================================================================= arguments and running statistics


def _feature_shape(x: Array, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The sizes of ``x`` along ``axes``: the shape of per-feature parameters and statistics."""
    return tuple(x.shape[a] for a in axes)


def _feature_view(rank: int, feature_axes: tuple[int, ...], shape) -> tuple[int, ...]:
    """The broadcastable shape of per-feature parameters for an input of ``rank``."""
    view = [1] * rank
    for a in feature_axes:
        view[a] = shape[a]
    return tuple(view)


def _check_features(layer: str, x: Array, axes: tuple[int, ...], argument: str, **arrays: Any) -> tuple[int, ...]:
    """Checks that every array given (None: absent) has the feature shape of ``x`` along ``axes``
    (named ``argument``); returns that shape."""
    shape = _feature_shape(x, axes)
    for name, a in arrays.items():
        if a is not None and tuple(jnp.shape(a)) != shape:
            raise ValueError(
                f"{layer}: `{name}` has shape {tuple(jnp.shape(a))}, but the input of shape "
                f"{tuple(x.shape)} has {shape} features along `{argument}`={axes}; give it shape "
                f"{shape} (in a Flax model: build the layer, or re-run `init`, for this input's features)."
            )
    return shape


def _check_momentum(momentum: Any, *, layer: str) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"{layer}: momentum={momentum!r} must lie in [0, 1] (flax convention: "
            "running = momentum * running + (1 - momentum) * batch; PyTorch's 0.1 is 0.9 here)."
        )


def _ema(running: Array | None, batch: Array, momentum: float, valid: Array | None, dtype: Any) -> Array | None:
    """``momentum * running + (1 - momentum) * batch``, kept where ``valid`` is False (no data
    arrived), in ``running``'s dtype promoted with ``dtype`` (flax's: a complex batch mean makes
    the running mean complex). None stays None (statistics not tracked)."""
    if running is None:
        return None
    new = momentum * running + (1.0 - momentum) * batch
    if valid is not None:
        new = jnp.where(valid, new, running)
    return lax.stop_gradient(jnp.asarray(new, jnp.promote_types(jnp.result_type(running), dtype)))


def _normalizing_moments(count: Array, mean: Array, m2: Array) -> tuple[Array, Array]:
    """``(mean, var)`` to normalize with, from ``(count, mean, M2)``.

    Where no element was counted (a channel emptied by a mask) there is nothing to normalize
    by: the neutral statistics ``mean = 0, var = 1`` are used there, so the output is the
    affine part alone (``scale * x / sqrt(1 + eps) + bias``), never ``x / sqrt(eps)``. Every layer
    takes its statistics through here.
    """
    has = count > 0
    return jnp.where(has, mean, 0), jnp.where(has, m2 / jnp.maximum(count, 1), 1)


# ============================================================================= batch statistics


class _Layout(NamedTuple):
    """Static facts about one input: how statistics are taken and broadcast back."""

    features: tuple[int, ...]  # the feature axes of x
    reduce: tuple[int, ...]  # axes the statistics reduce (of the ghost view, if any)
    shape: tuple[int, ...]  # feature shape: the shape of parameters and running statistics
    view: tuple[int, ...]  # per-feature arrays reshaped to broadcast against x
    ghosts: int | None  # number of ghost batches (virtual_batch_size), or None
    batch: int  # size of axis 0

    @overload
    def ghost_view(self, a: Array) -> Array: ...
    @overload
    def ghost_view(self, a: None) -> None: ...

    def ghost_view(self, a: Array | None) -> Array | None:
        """Reshape in: x (or its mask) with a leading axis of ghost batches."""
        if a is None or self.ghosts is None:
            return a
        return jnp.reshape(a, (self.ghosts, a.shape[0] // self.ghosts) + a.shape[1:])

    @overload
    def expand(self, stat: Array) -> Array: ...
    @overload
    def expand(self, stat: None) -> None: ...

    def expand(self, stat: Array | None) -> Array | None:
        """Reshape out: per-feature (or per-ghost-batch) statistics broadcast against x."""
        if stat is None:
            return None
        if self.ghosts is None or jnp.ndim(stat) == len(self.shape):  # one per feature
            return jnp.reshape(stat, self.view)
        per_ghost = jnp.reshape(stat, (self.ghosts, 1) + self.view[1:])
        repeated = jnp.broadcast_to(per_ghost, (self.ghosts, self.batch // self.ghosts) + self.view[1:])
        return jnp.reshape(repeated, (self.batch,) + self.view[1:])


def _layout(x: Array, axis: Axes, virtual_batch_size: int | None, layer: str) -> _Layout:
    """Validates ``axis`` and ``virtual_batch_size`` against ``x``."""
    features = _stats.canonicalize_axes(x.ndim, axis, argument="axis", layer=layer)
    reduce = tuple(i for i in range(x.ndim) if i not in features)
    v, ghosts = virtual_batch_size, None
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise ValueError(f"{layer}: virtual_batch_size={v!r} must be a positive int or None.")
        if 0 in features:
            raise ValueError(
                f"{layer}: virtual_batch_size needs axis 0 to be the batch axis, but "
                f"axis={axis!r} makes it a feature axis."
            )
        if x.shape[0] % v:
            raise ValueError(
                f"{layer}: virtual_batch_size={v} must divide the batch dimension "
                f"(axis 0) of the input, got shape {tuple(x.shape)}; choose a divisor "
                f"of {x.shape[0]} or pad the batch."
            )
        ghosts, reduce = x.shape[0] // v, tuple(a + 1 for a in reduce)
    shape = _feature_shape(x, features)
    view = _feature_view(x.ndim, features, x.shape)
    return _Layout(features, reduce, shape, view, ghosts, x.shape[0] if x.ndim else 1)


class _Sync(NamedTuple):
    """Where and how statistics are combined: the computation dtype and the mapped axis."""

    dtype: Any
    axis_name: str | None
    groups: Any
    layer: str


def _average_where(valid: Array, mean: Array, var: Array):
    """Averages over the leading axis of the entries where ``valid``; and how many there were."""
    n = jnp.sum(valid, 0)
    avg = lambda a: jnp.sum(jnp.where(valid, a, 0), 0) / jnp.maximum(n, 1)  # noqa: E731
    return avg(mean), avg(var), n


def _variance(x: Array, layout: _Layout, mask: Array | None, sync: _Sync):
    """The batch's mean and variance: ``(mean, var)`` for the map (one per ghost batch with
    ``virtual_batch_size``; neutral where empty) and ``(mean, var, valid)`` for the running
    averages.

    With ghost batches the running averages take the average over the ghost batches (and,
    with ``axis_name``, over the devices) that hold any valid element; ``valid`` is False
    for a feature no valid element reached, whose running statistics then stay as they were.
    """
    if layout.ghosts is None:
        count, mean, m2 = _stats.synced_moments(
            x, layout.reduce, mask=mask, dtype=sync.dtype, axis_name=sync.axis_name,
            axis_index_groups=sync.groups, layer=sync.layer,
        )
        mean, var = _normalizing_moments(count, mean, m2)
        return (mean, var), (mean, var, count > 0)
    # Ghost statistics stay on each device; only their averages, which feed the running
    # statistics, are averaged across devices, so every replica keeps the same batch_stats.
    count, mean, m2 = _stats.synced_moments(
        layout.ghost_view(x), layout.reduce, mask=layout.ghost_view(mask), dtype=sync.dtype,
        layer=sync.layer,
    )
    mean, var = _normalizing_moments(count, mean, m2)
    avg_mean, avg_var, n = _average_where(count > 0, mean, var)
    if sync.axis_name is not None:
        parts = [avg_mean, avg_var.astype(avg_mean.dtype), (n > 0).astype(avg_mean.dtype)]
        stacked, member = _stats.gather_all(jnp.stack(parts), sync.axis_name, sync.groups, layer=sync.layer)
        has = jnp.real(stacked[:, 2]) > 0
        if member is not None:
            has = jnp.logical_and(has, jnp.reshape(member, (-1,) + (1,) * (has.ndim - 1)))
        avg_mean, avg_var, n = _average_where(has, stacked[:, 0], stacked[:, 1])
    return (mean, var), (avg_mean, jnp.real(avg_var), n > 0)


def _batch_map(
    x: Array, mean: Array | None, var: Array | None, scale: Array | None, bias: Array | None, *,
    training: bool, momentum: float, epsilon: float, axis: Axes, mask: Array | None,
    axis_name: str | None, axis_index_groups: Any, virtual_batch_size: int | None, dtype: Any,
    layer: str, spread: Callable = _variance, divide: bool = True, correction: Callable | None = None,
) -> tuple[AffineMap, BatchStats]:
    """The one batch-statistics function: every layer of the family is this with its ``spread``
    (how the batch's deviation is measured), ``divide`` (False: centre only) and
    ``correction`` (BatchRenorm's ``r`` and ``d``).

    Returns the output map ``y = (x - mean) * mul + add`` and the new running statistics.
    ``correction(batch_mean, batch_var, inv, running_mean, running_var, valid) -> (inv, offset)``
    rewrites the training map's ``1/sqrt(var + eps)`` and adds an offset (before ``scale``),
    given the running statistics before this step (``valid``: the features any element reached).
    """
    # Ghost batches only shape the batch statistics: inference takes any batch size.
    layout = _layout(x, axis, virtual_batch_size if training else None, layer)
    _check_features(layer, x, layout.features, "axis", mean=mean, var=var, scale=scale, bias=bias)
    _check_momentum(momentum, layer=layer)
    mask = _stats.check_mask(mask, x, layer=layer)
    offset = None
    if training:
        sync = _Sync(dtype, axis_name, axis_index_groups, layer)
        (batch_mean, batch_var), (run_mean, run_var, valid) = spread(jnp.asarray(x, _stats.stats_dtype(x.dtype, dtype)), layout, mask, sync)
        nominal = _stats.stats_dtype(x.dtype, dtype)
        stats = BatchStats(_ema(mean, run_mean, momentum, valid, nominal),
                           _ema(var, run_var, momentum, valid, jnp.finfo(nominal).dtype))
        center = batch_mean
        inv = lax.rsqrt(batch_var + epsilon) if divide else None
        if correction is not None:
            inv, offset = correction(batch_mean, batch_var, inv, mean, var, valid)
    else:
        if mean is None or (divide and var is None):
            raise ValueError(
                f"{layer}: training=False normalizes by the running statistics, but "
                f"{'`mean`' if mean is None else '`var`'} is None; pass the running statistics "
                "(or training=True to use the batch's)."
            )
        stats = BatchStats(mean, var)
        center = mean
        inv = lax.rsqrt(var + epsilon) if divide and var is not None else None
    if inv is None:
        inv = jnp.ones(jnp.shape(center), jnp.real(center).dtype)
    view = lambda p: None if p is None else jnp.reshape(p, layout.view)  # noqa: E731
    amap = AffineMap.normalizing(
        x, layout.expand(center), layout.expand(inv), scale=view(scale), bias=view(bias),
        offset=layout.expand(offset), dtype=dtype,
    )
    return amap, stats


def _batch_options(momentum, epsilon, axis, mask, axis_name, axis_index_groups, virtual_batch_size, dtype):
    return dict(momentum=momentum, epsilon=epsilon, axis=axis, mask=mask, axis_name=axis_name,
                axis_index_groups=axis_index_groups, virtual_batch_size=virtual_batch_size, dtype=dtype)


def batch_norm(
    x: Array, mean: Array | None = None, var: Array | None = None, scale: Array | None = None,
    bias: Array | None = None, *, training: bool, momentum: float = 0.99, epsilon: float = 1e-5,
    axis: Axes = -1, mask: Array | None = None, axis_name: str | None = None,
    axis_index_groups: Any = None, virtual_batch_size: int | None = None, dtype: Any = None,
) -> tuple[Array, BatchStats]:
    r"""Batch normalization (Ioffe & Szegedy 2015, arXiv:1502.03167).

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with :math:`\mu, \sigma^2` the mean and (biased) variance over every axis but ``axis`` in
    training, the running ``mean``, ``var`` otherwise.

    Args:
      x: the input.
      mean, var: running statistics, of the feature shape (may be None in training: then the
        returned ones are None too).
      scale, bias: ``gamma`` and ``beta`` (None: absent).
      training: normalize by the batch's statistics (and update the running ones).
      momentum: ``running = momentum * running + (1 - momentum) * batch``.
      epsilon: added to the variance.
      axis: the feature axis or axes; statistics are taken over all others.
      mask: boolean, broadcastable to ``x``: the elements that enter the statistics.
      axis_name, axis_index_groups: combine the statistics across a mapped axis (groups of it).
      virtual_batch_size: ghost batches (Hoffer et al. 2017): statistics over consecutive
        sub-batches of this many examples; the running statistics take their average.
      dtype: the output dtype.

    Returns:
      ``(y, BatchStats(mean, var))``, the new running statistics.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> y, stats = F.batch_norm(x, jnp.zeros(2), jnp.ones(2), training=True, momentum=0.5)
      >>> [[round(float(v), 3) for v in row] for row in y], stats.mean.tolist(), stats.var.tolist()
      ([[-1.0, -1.0], [1.0, 1.0]], [1.0, 10.0], [1.0, 50.5])
    """
    amap, stats = _batch_map(
        x, mean, var, scale, bias, training=training, layer="batch_norm",
        **_batch_options(momentum, epsilon, axis, mask, axis_name, axis_index_groups, virtual_batch_size, dtype),
    )
    return amap(x), stats


def mean_only_batch_norm(
    x: Array, mean: Array | None = None, scale: Array | None = None, bias: Array | None = None, *,
    training: bool, momentum: float = 0.99, axis: Axes = -1, mask: Array | None = None,
    axis_name: str | None = None, axis_index_groups: Any = None, virtual_batch_size: int | None = None,
    dtype: Any = None,
) -> tuple[Array, BatchStats]:
    r"""Mean-only batch normalization (Salimans & Kingma 2016, arXiv:1602.07868, sec. 3.2).

    .. math:: y = \gamma (x - \mu) + \beta

    with :math:`\mu` the batch mean in training, the running ``mean`` otherwise; no division.
    Arguments as :func:`batch_norm` (no variance). Returns ``(y, BatchStats(mean, None))``.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> y, stats = F.mean_only_batch_norm(jnp.arange(6.0).reshape(3, 2), jnp.zeros(2), training=True)
      >>> y.tolist()
      [[-2.0, -2.0], [0.0, 0.0], [2.0, 2.0]]
    """
    amap, stats = _batch_map(
        x, mean, None, scale, bias, training=training, layer="mean_only_batch_norm", divide=False,
        **_batch_options(momentum, 0.0, axis, mask, axis_name, axis_index_groups, virtual_batch_size, dtype),
    )
    return amap(x), stats


def _frozen_map(x: Array, mean: Array | None, var: Array | None, scale: Array | None, bias: Array | None, *,
                epsilon: float, axis: Axes, dtype: Any, layer: str) -> AffineMap:
    """FrozenBatchNorm's map: the inference map of :func:`batch_norm`, with no gradient to the
    statistics or the affine parameters."""
    if mean is None or var is None:
        raise ValueError(
            f"{layer}: a frozen BatchNorm normalizes by fixed statistics: pass `mean` and `var` (got "
            f"{'mean=None' if mean is None else 'var=None'})."
        )
    fixed = [None if a is None else lax.stop_gradient(a) for a in (mean, var, scale, bias)]
    amap, _ = _batch_map(x, *fixed, training=False, layer=layer,
                         **_batch_options(0.99, epsilon, axis, None, None, None, None, dtype))
    return amap


def frozen_batch_norm(
    x: Array, mean: Array, var: Array, scale: Array | None = None, bias: Array | None = None, *,
    epsilon: float = 1e-5, axis: Axes = -1, dtype: Any = None,
) -> Array:
    r"""Frozen batch normalization: fixed statistics and affine, as torchvision's
    ``FrozenBatchNorm2d`` (the detection backbones' fine-tuning layer).

    .. math:: y = \mathrm{sg}(\gamma) \frac{x - \mathrm{sg}(\mu)}{\sqrt{\mathrm{sg}(\sigma^2) + \epsilon}} + \mathrm{sg}(\beta)

    with ``mean``, ``var`` the stored running statistics and :math:`\mathrm{sg}` a stop-gradient:
    :func:`batch_norm` at inference whatever the mode, gradients only to ``x``, nothing updated.

    Args:
      x: the input.
      mean, var: the fixed statistics, of the feature shape.
      scale, bias: ``gamma`` and ``beta`` (None: absent); not trained.
      epsilon: added to the variance (torchvision's default, 1e-5, is flax's too).
      axis: the feature axis or axes.
      dtype: the output dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> F.frozen_batch_norm(x, jnp.array([2.0, 20.0]), jnp.array([1.0, 100.0]), epsilon=0.0).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> jax.grad(lambda s: F.frozen_batch_norm(x, jnp.zeros(2), jnp.ones(2), s).sum())(jnp.ones(2)).tolist()
      [0.0, 0.0]
    """
    return _frozen_map(x, mean, var, scale, bias, epsilon=epsilon, axis=axis, dtype=dtype,
                       layer="frozen_batch_norm")(x)


# --------------------------------------------------------------------------- BatchRenorm

# The share of the way from the bounds (1, 0) to (r_max, d_max) after `steps` of `warmup`.
_SCHEDULES = {
    "linear": lambda steps, warmup: 1.0 if warmup == 0 else jnp.minimum(jnp.asarray(steps, jnp.float32) / warmup, 1.0),
    "step": lambda steps, warmup: (jnp.asarray(steps) >= warmup).astype(jnp.float32),
}


def _check_renorm(r_max, d_max, warmup_steps, warmup_schedule, layer):
    if not r_max >= 1.0:
        raise ValueError(
            f"{layer}: r_max={r_max!r} must be >= 1 (r is clipped to [1/r_max, r_max]); "
            "use r_max=1 for plain BatchNorm."
        )
    if not d_max >= 0.0:
        raise ValueError(
            f"{layer}: d_max={d_max!r} must be >= 0 (d is clipped to [-d_max, d_max]); "
            "use d_max=0 for plain BatchNorm."
        )
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"{layer}: warmup_steps={warmup_steps!r} must be an int >= 0.")
    if warmup_schedule not in _SCHEDULES:
        raise ValueError(
            f"{layer}: warmup_schedule={warmup_schedule!r} is not one of "
            f"{sorted(_SCHEDULES)}; use 'linear' (the paper) or 'step' (CrossQ / sbx)."
        )


def renorm_correction(mean, inv_batch, running_mean, running_var, epsilon, r_max, d_max, valid=None):
    """BatchRenorm's ``(r, d)``, gradients stopped: ``r = clip(sigma_B / sigma, 1/r_max, r_max)``,
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` against the running statistics ``mu,
    sigma`` before this step (``sigma_B = 1 / inv_batch``); ``r = 1, d = 0`` where ``valid`` is
    False (no element reached the feature: its neutral statistics stay neutral)."""
    inv_run = lax.rsqrt(running_var + epsilon)
    r = jnp.clip(inv_run / inv_batch, 1.0 / r_max, r_max)
    d = (mean - running_mean) * inv_run
    # Clipped in magnitude: clip(d, -d_max, d_max) for real d, and the same bound on |d|
    # for complex inputs, whose d has no order.
    size = jnp.abs(d)
    d = jnp.where(size > d_max, d * (d_max / jnp.maximum(size, jnp.finfo(size.dtype).tiny)), d)
    if valid is not None:
        r, d = jnp.where(valid, r, 1.0), jnp.where(valid, d, 0.0)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _renorm_map(x, mean, var, steps, scale, bias, *, training, r_max, d_max, warmup_steps,
                warmup_schedule, layer, correct=True, **options):
    """BatchRenorm's map; ``correct=False`` normalizes as BatchNorm (flax's ``init``, which has no
    running statistics yet, as sbx does)."""
    _check_renorm(r_max, d_max, warmup_steps, warmup_schedule, layer)
    if mean is None or var is None or steps is None:
        raise ValueError(f"{layer}: BatchRenorm corrects by its running statistics: pass `mean`, `var` and `steps`.")
    epsilon = options["epsilon"]

    def correction(batch_mean, batch_var, inv, run_mean, run_var, valid):
        t = _SCHEDULES[warmup_schedule](steps, warmup_steps)
        r, d = renorm_correction(batch_mean, inv, run_mean, run_var, epsilon,
                                 1.0 + (r_max - 1.0) * t, d_max * t, valid)
        return inv * r, d

    amap, (new_mean, new_var) = _batch_map(x, mean, var, scale, bias, training=training, layer=layer,
                                           correction=correction if correct else None, **options)
    assert new_mean is not None and new_var is not None  # given running statistics, _batch_map returns them
    return amap, RenormStats(new_mean, new_var, steps + 1 if training else steps)


def batch_renorm(
    x: Array, mean: Array, var: Array, steps: Array, scale: Array | None = None,
    bias: Array | None = None, *, training: bool, r_max: float = 3.0, d_max: float = 5.0,
    warmup_steps: int = 5000, warmup_schedule: str = "linear", momentum: float = 0.99,
    epsilon: float = 1e-5, axis: Axes = -1, mask: Array | None = None, axis_name: str | None = None,
    axis_index_groups: Any = None, virtual_batch_size: int | None = None, dtype: Any = None,
) -> tuple[Array, RenormStats]:
    r"""Batch renormalization (Ioffe 2017, arXiv:1702.03275).

    In training, with batch statistics :math:`\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and
    running ones :math:`\mu, \sigma = \sqrt{\mathrm{var} + \epsilon}` (before this step):

    .. math::
        r = \mathrm{sg}\big(\mathrm{clip}(\sigma_B / \sigma, 1/r_{max}, r_{max})\big),\quad
        d = \mathrm{sg}\big(\mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max})\big),\quad
        y = \gamma \Big(\frac{x - \mu_B}{\sigma_B} r + d\Big) + \beta

    (``sg``: stop gradient; complex ``d`` is clipped in magnitude). The bounds relax from
    ``(1, 0)`` (BatchNorm) to ``(r_max, d_max)`` over ``warmup_steps`` counted by ``steps``:
    linearly (``"linear"``, the paper) or at once when ``steps`` reaches ``warmup_steps``
    (``"step"``, CrossQ / sbx). Not training: BatchNorm with the running statistics.
    Other arguments as :func:`batch_norm`.

    Returns:
      ``(y, RenormStats(mean, var, steps))``; ``steps`` is incremented in training.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)) * 4 + 2
      >>> y, stats = F.batch_renorm(x, jnp.zeros(3), jnp.ones(3), jnp.int32(0), training=True,
      ...                           r_max=2.0, d_max=1.0, warmup_steps=0)
      >>> int(stats.steps), round(float(y.std()), 2), round(float(y.mean()), 2)  # r = 2, d = 1
      (1, 2.0, 1.0)
    """
    amap, stats = _renorm_map(
        x, mean, var, steps, scale, bias, training=training, r_max=r_max, d_max=d_max,
        warmup_steps=warmup_steps, warmup_schedule=warmup_schedule, layer="batch_renorm",
        **_batch_options(momentum, epsilon, axis, mask, axis_name, axis_index_groups, virtual_batch_size, dtype),
    )
    return amap(x), stats


# --------------------------------------------------------------------------- Lp deviations

# Each Lp deviation times this constant is the standard deviation for Gaussian data:
# E|x - mu| = sigma * sqrt(2 / pi). The maximum has no such constant (it grows with the
# batch, like sigma * sqrt(2 ln n)); it is used as it is.
_LP_SCALE = {1: math.sqrt(math.pi / 2), 2: 1.0, math.inf: 1.0}


def _lp_order(p: Any, layer: str) -> int | float:
    order = math.inf if p in ("inf", "Inf") else p
    if isinstance(order, bool) or not isinstance(order, numbers.Real) or order not in _LP_SCALE:
        raise ValueError(
            f"{layer}: p={p!r} must be 1, 2 or math.inf ('inf'): the L1 (mean "
            "absolute deviation), L2 (standard deviation) or L-infinity (maximum) deviation."
        )
    return 1 if order == 1 else 2 if order == 2 else math.inf


def _lp_spread(p: float) -> Callable:
    """The batch's mean and squared Lp deviation ``(s_p * c_p)^2``, as :func:`_variance` returns them."""

    def spread(x: Array, layout: _Layout, mask: Array | None, sync: _Sync):
        if layout.ghosts is not None:
            raise ValueError(
                f"{sync.layer}: virtual_batch_size={layout.batch // layout.ghosts} needs p=2, got p={p!r}; leave "
                "virtual_batch_size=None for the L1 and L-infinity deviations."
            )
        if jnp.iscomplexobj(x):
            raise TypeError(
                f"{sync.layer}: a complex input (dtype {x.dtype}) needs p=2, got p={p!r}; the "
                "L1 and L-infinity deviations are defined here for real inputs only."
            )
        count, mean, dev = _lp_deviation(x, layout.reduce, mask, p, sync)
        var = jnp.where(count > 0, jnp.square(dev * _LP_SCALE[p]), 1.0)
        mean = jnp.where(count > 0, mean, 0.0)
        return (mean, var), (mean, var, count > 0)

    return spread


def _lp_deviation(x: Array, axes: tuple[int, ...], mask: Array | None, p: float, sync: _Sync):
    """``(count, mean, s)``: the L1 mean absolute deviation or the L∞ maximum deviation about
    the batch mean, over ``axes`` and across ``axis_name``."""
    name, groups, layer = sync.axis_name, sync.groups, sync.layer
    if p == 1:  # the mean of the union (first collective), then the deviations about it (second)
        count, mean, _ = _stats.synced_moments(x, axes, mask=mask, axis_name=name,
                                                axis_index_groups=groups, layer=layer)
        spread = jnp.abs(x - jnp.expand_dims(mean, axes))
        _, dev, _ = _stats.synced_moments(spread, axes, mask=mask, axis_name=name,
                                          axis_index_groups=groups, layer=layer)
        return count, mean, dev
    count, mean, m2 = _stats.local_moments(x, axes, mask, True)
    valid = jnp.ones(x.shape, bool) if mask is None else mask
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), axes)
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axes)
    if name is not None:  # one collective: every device's count, mean, M2, max and min
        stacked, member = _stats.gather_all(jnp.stack([count, mean, m2, hi, lo]), name, groups, layer=layer)
        n_i = stacked[:, 0]
        if member is not None:
            n_i = jnp.where(jnp.reshape(member, (-1,) + (1,) * (n_i.ndim - 1)), n_i, 0)
        count, mean, _ = _stats.combine_moments(n_i, stacked[:, 1], jnp.where(n_i > 0, stacked[:, 2], 0))
        hi = jnp.max(jnp.where(n_i > 0, stacked[:, 3], -jnp.inf), 0)
        lo = jnp.min(jnp.where(n_i > 0, stacked[:, 4], jnp.inf), 0)
    dev = jnp.maximum(hi - mean, mean - lo)
    return count, mean, jnp.where(count > 0, dev, 0.0)


def _lp_map(x, mean, var, scale, bias, *, p, training, layer, **options):
    order = _lp_order(p, layer)
    spread = _variance if order == 2 else _lp_spread(order)
    return _batch_map(x, mean, var, scale, bias, training=training, layer=layer, spread=spread, **options)


def lp_batch_norm(
    x: Array, mean: Array | None = None, var: Array | None = None, scale: Array | None = None,
    bias: Array | None = None, *, p: float | str = 2, training: bool, momentum: float = 0.99,
    epsilon: float = 1e-5, axis: Axes = -1, mask: Array | None = None, axis_name: str | None = None,
    axis_index_groups: Any = None, virtual_batch_size: int | None = None, dtype: Any = None,
) -> tuple[Array, BatchStats]:
    r"""Batch normalization by the batch's Lp deviation (Santurkar et al. 2018, arXiv:1805.11604, sec. 3.3).

    .. math::
        s_1 = \sqrt{\pi/2}\; \mathrm{E}\,|x - \mu_B|,\quad
        s_2 = \sqrt{\mathrm{E}\,|x - \mu_B|^2},\quad s_\infty = \max |x - \mu_B|,\qquad
        y = \gamma \frac{x - \mu_B}{\sqrt{s_p^2 + \epsilon}} + \beta

    ``s_1`` is scaled to equal the standard deviation for Gaussian data; ``p=2`` is
    :func:`batch_norm`. The running statistics are ``mean`` and ``var = s_p^2``, used as
    BatchNorm's when not training. With ``axis_name``: ``p=2`` and ``p=inf`` take one
    collective, ``p=1`` two (the absolute deviations about the global mean need it first).
    ``virtual_batch_size`` and complex inputs need ``p=2``. Arguments as :func:`batch_norm`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jnp.array([[0.0], [1.0], [5.0]])
      >>> y, _ = F.lp_batch_norm(x, p="inf", training=True, epsilon=0.0)
      >>> [round(float(v), 3) for v in y[:, 0]]  # centred by the mean 2, divided by max |x - 2| = 3
      [-0.667, -0.333, 1.0]
    """
    amap, stats = _lp_map(
        x, mean, var, scale, bias, p=p, training=training, layer="lp_batch_norm",
        **_batch_options(momentum, epsilon, axis, mask, axis_name, axis_index_groups, virtual_batch_size, dtype),
    )
    return amap(x), stats


# --------------------------------------------------------------------------- noisy BatchNorm


def _check_noise(shift_range, scale_range, noise_width, layer) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        low = high = math.nan
    if not low <= high:
        raise ValueError(
            f"{layer}: scale_range={scale_range!r} must be a pair (low, high) with "
            "low <= high, e.g. (1.0, 1.25)."
        )
    for name, value in (("shift_range", shift_range), ("noise_width", noise_width)):
        if not value >= 0:
            raise ValueError(f"{layer}: {name}={value!r} must be >= 0.")
    return low, high


def _noise(amap: AffineMap, x: Array, axis: Axes, key: Array, shift_range: float,
           scale_range: tuple[float, float], noise_width: float, layer: str) -> AffineMap:
    """``amap`` followed by Santurkar et al.'s per-activation scale and shift noise."""
    low, high = _check_noise(shift_range, scale_range, noise_width, layer)
    features = _stats.canonicalize_axes(x.ndim, axis, argument="axis", layer=layer)
    shape, view = _feature_shape(x, features), _feature_view(x.ndim, features, x.shape)
    k_mu, k_sigma, k_scale, k_shift = jax.random.split(key, 4)
    real = jnp.real(amap.mul).dtype
    mu = jnp.reshape(jax.random.uniform(k_mu, shape, real, -shift_range, shift_range), view)
    sigma = jnp.reshape(jax.random.uniform(k_sigma, shape, real, low, high), view)
    w = noise_width
    scale = sigma + w * jax.random.normal(k_scale, x.shape, real)
    shift = mu + jax.random.uniform(k_shift, x.shape, real, -w, w)
    return amap.then(scale, shift)


def _noisy_map(x, mean, var, scale, bias, *, key, training, shift_range, scale_range, noise_width,
               layer, **options):
    """Noisy BatchNorm's map; without ``key`` (flax's ``init``) no noise is drawn."""
    _check_noise(shift_range, scale_range, noise_width, layer)
    amap, stats = _batch_map(x, mean, var, scale, bias, training=training, layer=layer, **options)
    if training and key is not None:
        amap = _noise(amap, x, options["axis"], key, shift_range, scale_range, noise_width, layer)
    return amap, stats


def noisy_batch_norm(
    x: Array, mean: Array | None = None, var: Array | None = None, scale: Array | None = None,
    bias: Array | None = None, *, key: Array | None = None, training: bool, shift_range: float = 0.5,
    scale_range: tuple[float, float] = (1.0, 1.25), noise_width: float = 0.1, momentum: float = 0.99,
    epsilon: float = 1e-5, axis: Axes = -1, mask: Array | None = None, axis_name: str | None = None,
    axis_index_groups: Any = None, virtual_batch_size: int | None = None, dtype: Any = None,
) -> tuple[Array, BatchStats]:
    r"""BatchNorm followed by noise that shifts every activation's distribution at every step
    ("noisy" BatchNorm of Santurkar et al. 2018, arXiv:1805.11604, sec. 2.1).

    In training each feature ``j`` draws :math:`\mu_j \sim U(-\mathrm{shift\_range},
    \mathrm{shift\_range})`, :math:`\sigma_j \sim U(\mathrm{scale\_range})`, then every activation
    ``i`` of it a scale and a shift around them:

    .. math::
        s_{ij} \sim \mathcal{N}(\sigma_j, w^2),\quad m_{ij} \sim U(\mu_j - w, \mu_j + w),\quad
        y_{ij} = s_{ij}\, \mathrm{BN}(x)_{ij} + m_{ij}

    with ``w = noise_width`` and ``BN`` :func:`batch_norm` (scale and bias included), all from
    ``key``. Not training: :func:`batch_norm` with the running statistics (``key`` unused).
    The running statistics are the input's. Other arguments as :func:`batch_norm`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (512, 4))
      >>> y, _ = F.noisy_batch_norm(x, key=jax.random.key(1), training=True)
      >>> bool(jnp.any(jnp.abs(y.mean(0)) > 0.05))  # shifted on purpose
      True
    """
    if training and key is None:
        raise ValueError("noisy_batch_norm: training draws noise: pass `key` (a jax.random key).")
    amap, stats = _noisy_map(
        x, mean, var, scale, bias, key=key, training=training, shift_range=shift_range,
        scale_range=scale_range, noise_width=noise_width, layer="noisy_batch_norm",
        **_batch_options(momentum, epsilon, axis, mask, axis_name, axis_index_groups, virtual_batch_size, dtype),
    )
    return amap(x), stats


# ============================================================================= per-sample statistics


def _sample_map(
    x: Array, scale: Array | None, bias: Array | None, *, reduction_axes: tuple[int, ...],
    feature_axes: tuple[int, ...], epsilon: float, mask: Array | None, use_mean: bool,
    axis_name: str | None, axis_index_groups: Any, dtype: Any, layer: str,
) -> AffineMap:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` with the statistics over
    ``reduction_axes`` of each example (LayerNorm, RMSNorm, InstanceNorm)."""
    _check_features(layer, x, feature_axes, "feature_axes", scale=scale, bias=bias)
    count, mean, m2 = _stats.synced_moments(
        x, reduction_axes, mask=mask, use_mean=use_mean, dtype=dtype, axis_name=axis_name,
        axis_index_groups=axis_index_groups, layer=layer,
    )
    mean, var = _normalizing_moments(count, mean, m2)
    return _per_feature_map(x, mean, var, scale, bias, reduction_axes, feature_axes, epsilon, dtype)


def _per_feature_map(x, mean, var, scale, bias, reduction_axes, feature_axes, epsilon, dtype) -> AffineMap:
    view = lambda p: None if p is None else jnp.reshape(p, _feature_view(x.ndim, feature_axes, x.shape))  # noqa: E731
    return AffineMap.normalizing(
        x, jnp.expand_dims(mean, reduction_axes), jnp.expand_dims(lax.rsqrt(var + epsilon), reduction_axes),
        scale=view(scale), bias=view(bias), dtype=dtype,
    )


def _axes(x: Array, axes: Axes, argument: str, layer: str) -> tuple[int, ...]:
    return _stats.canonicalize_axes(x.ndim, axes, argument=argument, layer=layer)


def layer_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, epsilon: float = 1e-6,
    reduction_axes: Axes = -1, feature_axes: Axes = -1, mask: Array | None = None,
    axis_name: str | None = None, axis_index_groups: Any = None, dtype: Any = None,
) -> Array:
    r"""Layer normalization (Ba et al. 2016, arXiv:1607.06450).

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    with mean and variance over ``reduction_axes`` of each example, ``scale`` and ``bias`` of
    the shape of ``x`` along ``feature_axes``. ``axis_name`` combines the statistics of one
    example split across devices (sequence parallelism), weighted by counts.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> y = F.layer_norm(jnp.array([[1.0, 2.0, 3.0], [1e4, 1e4 + 1, 1e4 + 2]]))
      >>> [[round(float(v), 3) for v in row] for row in y]
      [[-1.225, 0.0, 1.225], [-1.225, 0.0, 1.225]]
    """
    red, feat = _axes(x, reduction_axes, "reduction_axes", "layer_norm"), _axes(x, feature_axes, "feature_axes", "layer_norm")
    return _sample_map(x, scale, bias, reduction_axes=red, feature_axes=feat, epsilon=epsilon, mask=mask,
                       use_mean=True, axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
                       layer="layer_norm")(x)


def rms_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, epsilon: float = 1e-6,
    reduction_axes: Axes = -1, feature_axes: Axes = -1, mask: Array | None = None,
    axis_name: str | None = None, axis_index_groups: Any = None, dtype: Any = None,
) -> Array:
    r"""Root-mean-square normalization (Zhang & Sennrich 2019, arXiv:1910.07467).

    .. math:: y = \gamma \frac{x}{\sqrt{\mathrm{E}[|x|^2] + \epsilon}} + \beta

    over ``reduction_axes`` of each example; no centring (``bias`` is normzoo's option, absent
    by default). Other arguments as :func:`layer_norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> y = F.rms_norm(jnp.array([[3.0, 4.0]]), epsilon=0.0) * jnp.sqrt(12.5)
      >>> [round(float(v), 3) for v in y[0]]
      [3.0, 4.0]
    """
    red, feat = _axes(x, reduction_axes, "reduction_axes", "rms_norm"), _axes(x, feature_axes, "feature_axes", "rms_norm")
    return _sample_map(x, scale, bias, reduction_axes=red, feature_axes=feat, epsilon=epsilon, mask=mask,
                       use_mean=False, axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
                       layer="rms_norm")(x)


def _groups(channels: int, num_groups: int | None, group_size: int | None, layer: str, shape=None) -> int:
    """The number of groups, validated against the number of channels."""
    where = "" if shape is None else f" of the input (shape {tuple(shape)})"
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{layer}: give exactly one of num_groups={num_groups!r} and "
            f"group_size={group_size!r}; to use group_size pass num_groups=None "
            "(num_groups defaults to 32)."
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size <= 0 or channels % group_size:
            raise ValueError(
                f"{layer}: group_size={group_size!r} must be positive and divide the "
                f"{channels} channels{where}; choose a divisor of {channels}."
            )
        return channels // group_size
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"{layer}: num_groups={num_groups!r} must be positive and divide the {channels} "
            f"channels{where}; choose a divisor of {channels}, or set group_size instead."
        )
    return int(num_groups)


def _group_map(x, scale, bias, *, num_groups, group_size, epsilon, reduction_axes, mask, axis_name,
               axis_index_groups, dtype, layer) -> AffineMap:
    red = reduction_axes
    if red is None:  # flax's default: every axis but the first, and the channels
        red = tuple(range(1, x.ndim - 1)) + (-1,)
    red = _stats.canonicalize_axes(x.ndim, red, argument="reduction_axes", layer=layer)
    if red[-1] != x.ndim - 1:
        raise ValueError(
            f"{layer}: reduction_axes={reduction_axes!r} must include the last "
            "(channel) axis, which is split into groups; add -1."
        )
    channels = x.shape[-1]
    groups = _groups(channels, num_groups, group_size, layer, x.shape)
    _check_features(layer, x, (x.ndim - 1,), "the channel axis", scale=scale, bias=bias)
    size = channels // groups
    spatial = red[:-1]
    # Per-channel (count, mean, M2) over the spatial axes in the natural layout, then
    # Chan's combination across the channels of each group: only the small per-channel
    # statistics are regrouped, never the activations.
    count, mean, m2 = _stats.synced_moments(
        x, spatial, mask=mask, dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups, layer=layer,
    )
    grouped = lambda a: jnp.reshape(a, a.shape[:-1] + (groups, size))  # noqa: E731
    count, gmean, gm2 = _stats.combine_moments(grouped(count), grouped(mean), grouped(m2), axis=-1)
    gmean, gvar = _normalizing_moments(count, gmean, gm2)
    per_channel = lambda a: jnp.repeat(a, size, axis=-1)  # noqa: E731
    return _per_feature_map(x, per_channel(gmean), per_channel(gvar), scale, bias, spatial, (x.ndim - 1,),
                            epsilon, dtype)


def group_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, num_groups: int | None = 32,
    group_size: int | None = None, epsilon: float = 1e-6, reduction_axes: Axes | None = None,
    mask: Array | None = None, axis_name: str | None = None, axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    r"""Group normalization (Wu & He 2018, arXiv:1803.08494).

    The channels (last axis) form ``num_groups`` groups of consecutive channels (or groups of
    ``group_size``); each example's group is normalized over its channels and
    ``reduction_axes`` (default: every axis but the first), then ``scale`` and ``bias`` per
    channel:

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} + \beta_c

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
      >>> y = F.group_norm(x, num_groups=2)
      >>> round(float(y[0, ..., :4].std()), 3), y.shape
      (1.0, (2, 4, 4, 8))
    """
    return _group_map(x, scale, bias, num_groups=num_groups, group_size=group_size, epsilon=epsilon,
                      reduction_axes=reduction_axes, mask=mask, axis_name=axis_name,
                      axis_index_groups=axis_index_groups, dtype=dtype, layer="group_norm")(x)


# --------------------------------------------------------------------------- PyTorch ports: FRN, GRN, EvoNorm


def _spatial_axes(x: Array, layer: str) -> tuple[int, ...]:
    """Every axis but the batch (first) and the channels (last): the per-example statistics of
    the channel-wise layers ported from PyTorch's NCHW modules (channels last here)."""
    if x.ndim < 2:
        raise ValueError(f"{layer}: x has shape {x.shape}; it needs a batch axis and a channel axis (last).")
    return tuple(range(1, x.ndim - 1))


def _output(y: Array, x: Array, *params: Array | None, dtype: Any) -> Array:
    return jnp.asarray(y, flax_dtypes.canonicalize_dtype(x, *(p for p in params if p is not None), dtype=dtype))


def filter_response_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, tau: Array | None = None, *,
    epsilon: float = 1e-5, mask: Array | None = None, dtype: Any = None,
) -> Array:
    r"""Filter response normalization with its thresholded linear unit (Singh & Krishnan 2020,
    arXiv:1911.09737), as timm's ``FilterResponseNormTlu2d``.

    .. math:: y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon}} + \beta,\ \tau\Big), \qquad
              \nu^2 = \mathrm{E}_{\text{spatial}}[x^2]

    per example and channel (channels last; ``nu^2`` over every axis but the first and the
    last, in at least float32). No centring and no batch dependence; ``tau=None`` leaves the TLU
    out (``FilterResponseNormAct2d`` then applies its own activation).

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jnp.array([[[3.0], [-4.0]]])                   # one example, 2 positions, 1 channel
      >>> [round(float(v), 3) for v in F.filter_response_norm(x, epsilon=0.0).ravel()]
      [0.849, -1.131]
      >>> [round(float(v), 3) for v in F.filter_response_norm(x, tau=jnp.zeros(1), epsilon=0.0).ravel()]
      [0.849, 0.0]
    """
    spatial = _spatial_axes(x, "filter_response_norm")
    _check_features("filter_response_norm", x, (x.ndim - 1,), "the channel axis", tau=tau)
    y = _sample_map(x, scale, bias, reduction_axes=spatial, feature_axes=(x.ndim - 1,), epsilon=epsilon, mask=mask,
                    use_mean=False, axis_name=None, axis_index_groups=None, dtype=dtype,
                    layer="filter_response_norm")(x)
    return y if tau is None else jnp.maximum(y, jnp.asarray(tau, y.dtype))


def _safe_sqrt(a: Array) -> Array:
    """``sqrt(a)`` with gradient 0, not NaN, where ``a`` is 0 (an all-zero channel)."""
    positive = a > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, a, 1.0)), 0.0)


def global_response_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, epsilon: float = 1e-6,
    mask: Array | None = None, dtype: Any = None,
) -> Array:
    r"""Global response normalization (Woo et al. 2023, ConvNeXt V2, arXiv:2301.00808), as
    timm's ``GlobalResponseNorm``.

    .. math:: G_{n,c} = \lVert x_{n,\cdot,c} \rVert_2, \quad N_{n,c} = \frac{G_{n,c}}{\mathrm{mean}_c G_{n,c} + \epsilon},
              \quad y = x + \gamma (x N) + \beta

    with the L2 norm over every axis but the first and the last (channels last), in at least
    float32; ``scale`` and ``bias`` start at zero in the layers, so GRN starts as the identity.
    An all-zero channel has norm 0 and gradient 0 (not NaN).

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jnp.array([[[3.0, 0.0], [4.0, 1.0]]])        # channel norms 5 and 1, mean 3
      >>> [round(float(v), 3) for v in F.global_response_norm(x, jnp.ones(2), epsilon=0.0).ravel()]
      [8.0, 0.0, 10.667, 1.333]
    """
    spatial = _spatial_axes(x, "global_response_norm")
    _check_features("global_response_norm", x, (x.ndim - 1,), "the channel axis", scale=scale, bias=bias)
    xs = jnp.asarray(x, _stats.stats_dtype(x.dtype, dtype))
    checked = _stats.check_mask(mask, x, layer="global_response_norm")
    xm = xs if checked is None else xs * checked
    g = _safe_sqrt(jnp.sum(_stats.abs_sq(xm), spatial, keepdims=True))
    n = g / (jnp.mean(g, -1, keepdims=True) + epsilon)
    y = xs + (xs * n if scale is None else scale * (xs * n)) + (0 if bias is None else bias)
    return _output(y, x, scale, bias, dtype=dtype)


def evonorm_s0(
    x: Array, scale: Array | None = None, bias: Array | None = None, v: Array | None = None, *,
    num_groups: int | None = 32, group_size: int | None = None, epsilon: float = 1e-5,
    mask: Array | None = None, dtype: Any = None,
) -> Array:
    r"""EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967), as timm's ``EvoNorm2dS0``: a sample-based
    normalization-activation layer.

    .. math:: y = \gamma \frac{x \, \mathrm{sigmoid}(v x)}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}} + \beta

    with :math:`\sigma^2_{n,g}` the (biased) variance of example ``n``'s group ``g`` of channels
    over the spatial axes (:func:`group_norm`'s statistics, stable). ``v=None`` leaves the
    activation and the normalization out (timm's ``apply_act=False``): only the affine map.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) + 1e4
      >>> y = F.evonorm_s0(x, v=jnp.ones(8), num_groups=2)
      >>> bool(jnp.isfinite(y).all()), y.shape
      (True, (2, 4, 4, 8))
    """
    _check_features("evonorm_s0", x, (x.ndim - 1,), "the channel axis", scale=scale, bias=bias, v=v)
    xs = jnp.asarray(x, _stats.stats_dtype(x.dtype, dtype))
    if v is None:
        y = xs
    else:
        spatial = _spatial_axes(x, "evonorm_s0")
        inv = _group_map(x, None, None, num_groups=num_groups, group_size=group_size, epsilon=epsilon,
                         reduction_axes=spatial + (-1,), mask=mask, axis_name=None, axis_index_groups=None,
                         dtype=dtype, layer="evonorm_s0").mul
        y = xs * jax.nn.sigmoid(v * xs) * inv
    y = y if scale is None else y * scale
    y = y if bias is None else y + bias
    return _output(y, x, scale, bias, v, dtype=dtype)


def _evonorm_b0_map(x, var, scale, bias, v, *, training, momentum, epsilon, mask, axis_name, axis_index_groups,
                    virtual_batch_size, dtype, layer):
    if not training and var is None:
        raise ValueError(f"{layer}: training=False normalizes by the running variance, but `var` is None; pass it "
                         "(or training=True to use the batch's).")
    _check_features(layer, x, (x.ndim - 1,), "the channel axis", var=var, scale=scale, bias=bias, v=v)
    xs = jnp.asarray(x, _stats.stats_dtype(x.dtype, dtype))
    new_var = var
    if v is None:
        y = xs
    else:
        if training:
            amap, stats = _batch_map(x, None, var, None, None, training=True, momentum=momentum, epsilon=epsilon,
                                     axis=-1, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
                                     virtual_batch_size=virtual_batch_size, dtype=dtype, layer=layer)
            left, new_var = 1.0 / amap.mul, stats.var
        else:
            left = jnp.sqrt(jnp.asarray(var, xs.dtype) + epsilon)
        spatial = _spatial_axes(x, layer)
        count, instance_mean, m2 = _stats.synced_moments(x, spatial, mask=mask, dtype=dtype, layer=layer)
        _, instance_var = _normalizing_moments(count, instance_mean, m2)
        right = v * xs + jnp.sqrt(jnp.expand_dims(instance_var, spatial) + epsilon)
        y = xs / jnp.maximum(left, right)
    y = y if scale is None else y * scale
    y = y if bias is None else y + bias
    return _output(y, x, scale, bias, v, dtype=dtype), new_var


def evonorm_b0(
    x: Array, var: Array | None = None, scale: Array | None = None, bias: Array | None = None,
    v: Array | None = None, *, training: bool, momentum: float = 0.99, epsilon: float = 1e-3,
    mask: Array | None = None, axis_name: str | None = None, axis_index_groups: Any = None,
    virtual_batch_size: int | None = None, dtype: Any = None,
) -> tuple[Array, Array | None]:
    r"""EvoNorm-B0 (Liu et al. 2020, arXiv:2004.02967), as timm's ``EvoNorm2dB0``: a batch-based
    normalization-activation layer.

    .. math:: y = \gamma \frac{x}{\max\big(\sqrt{\sigma^2_{B,c} + \epsilon},\ v x + \sqrt{\sigma^2_{n,c} + \epsilon}\big)} + \beta

    with :math:`\sigma^2_{B,c}` the batch's (biased) variance of channel ``c`` over every axis
    but the last in training (synced across ``axis_name`` like :func:`batch_norm`; the
    running ``var``, updated ``var = momentum * var + (1 - momentum) * batch``, at inference)
    and :math:`\sigma^2_{n,c}` example ``n``'s variance over the spatial axes. ``v=None``
    leaves the normalization out (timm's ``apply_act=False``). Differs from timm in the running
    variance only: biased and with flax's momentum convention, as :func:`batch_norm` (timm
    stores the unbiased one, ``momentum`` 0.1 = 1 - 0.9).

    Returns:
      ``(y, var)``: the output and the new running variance.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2
      >>> y, var = F.evonorm_b0(x, jnp.ones(3), v=jnp.ones(3), training=True, momentum=0.0)
      >>> bool(jnp.allclose(var, x.var((0, 1, 2)), rtol=1e-5)), y.shape
      (True, (8, 4, 4, 3))
    """
    return _evonorm_b0_map(x, var, scale, bias, v, training=training, momentum=momentum, epsilon=epsilon, mask=mask,
                           axis_name=axis_name, axis_index_groups=axis_index_groups,
                           virtual_batch_size=virtual_batch_size, dtype=dtype, layer="evonorm_b0")


# --------------------------------------------------------------------------- whitening: IterNorm


class WhiteningStats(NamedTuple):
    """IterNorm's running statistics: the ``mean`` (C,) and the ``whitening`` matrices
    (num_groups, c, c), one per group of ``c`` channels."""

    mean: Array | None
    whitening: Array | None


_HIGHEST = lax.Precision.HIGHEST  # covariances and whitening in full float32, also where TF32 is the default


def _whitening_groups(channels: int, group_size: Any, layer: str) -> tuple[int, int]:
    """``(num_groups, c)``: groups of ``group_size`` channels, one group of all when fewer."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size <= 0:
        raise ValueError(
            f"{layer}: group_size={group_size!r} must be a positive int: the number of channels whitened "
            "together (the paper's default is 64)."
        )
    size = min(int(group_size), max(channels, 1))
    if channels % size:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0 and d <= size]
        raise ValueError(
            f"{layer}: group_size={group_size} does not divide the {channels} channels of the input; choose "
            f"a divisor of {channels} (e.g. group_size={divisors[-1]}), or group_size >= {channels} to whiten "
            "all channels as one group."
        )
    return channels // size, size


def _whitening_layout(x: Array, axis: Axes, virtual_batch_size: int | None, group_size: Any,
                      layer: str) -> tuple[_Layout, int, int]:
    """``(layout, num_groups, c)``: ``axis`` (one) and the groups of its channels, validated."""
    layout = _layout(x, axis, virtual_batch_size, layer)
    if len(layout.features) != 1:
        raise ValueError(
            f"{layer}: axis={axis!r} names {len(layout.features)} axes; IterNorm whitens the channels of "
            "one feature axis: give one int (e.g. axis=-1 for channels last)."
        )
    return (layout, *_whitening_groups(layout.shape[0], group_size, layer))


def _check_iterations(iterations: Any, layer: str) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
        raise ValueError(
            f"{layer}: iterations={iterations!r} must be a non-negative int: the number T of Newton-Schulz "
            "steps (the paper's default is 5)."
        )
    return int(iterations)


def _row_mask(mask: Array | None, x: Array, axis: int, layer: str) -> Array | None:
    """The mask of positions (x's shape without the channel axis): a position enters the
    covariance with all its channels or not at all."""
    if mask is None:
        return None
    full = _stats.check_mask(mask, x, layer=layer)
    aligned = (1,) * (x.ndim - jnp.ndim(mask)) + tuple(jnp.shape(mask))
    if aligned[axis] != 1 and x.shape[axis] != 1:
        raise ValueError(
            f"{layer}: `mask` of shape {tuple(jnp.shape(mask))} varies along the channel axis {axis} of the input "
            f"of shape {tuple(x.shape)}; the covariance pairs channels, so a position counts for all of them "
            "or none: give the mask size 1 along that axis (e.g. mask[..., :1] for channels last)."
        )
    assert full is not None
    return lax.index_in_dim(full, 0, axis, keepdims=False)


def newton_schulz_whitening(sigma: Array, iterations: int = 5) -> Array:
    r"""IterNorm's whitening matrices of covariances ``sigma`` (``(..., c, c)``, symmetric positive
    definite): :math:`\Sigma_N = \Sigma / \mathrm{tr}\,\Sigma`, :math:`P_0 = I`,
    :math:`P_k = \tfrac12 (3 P_{k-1} - P_{k-1}^3 \Sigma_N)`, :math:`W = P_T / \sqrt{\mathrm{tr}\,\Sigma}`,
    which tends to :math:`\Sigma^{-1/2}` as ``iterations`` = T grows (Huang et al. 2019, arXiv:1904.03441).

    Computed in the coupled form (Higham, "Functions of Matrices", 2008, eq. 6.35):
    :math:`Y_0 = \Sigma_N, P_0 = I`, :math:`T_k = \tfrac12 (3I - P_{k-1} Y_{k-1})`,
    :math:`P_k = T_k P_{k-1}`, :math:`Y_k = Y_{k-1} T_k`. Every matrix here is a polynomial in
    :math:`\Sigma_N` (:math:`Y_k = \Sigma_N P_k`), so this is the paper's :math:`P_k` exactly, in as
    many products; but rounding errors do not grow in it, while the paper's form amplifies
    them once converged whenever the condition number of :math:`\Sigma` exceeds 9 (the
    float32 iteration overflows to NaN after ~20 steps on such data).

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> w = F.newton_schulz_whitening(jnp.diag(jnp.array([4.0, 1.0])), iterations=30)
      >>> [[round(float(v), 4) for v in row] for row in w]
      [[0.5, 0.0], [0.0, 1.0]]
    """
    c = sigma.shape[-1]
    trace = jnp.trace(sigma, axis1=-2, axis2=-1)[..., None, None]
    y = sigma / trace
    eye = jnp.eye(c, dtype=sigma.dtype)
    p = jnp.broadcast_to(eye, sigma.shape)
    def mm(a, b):
        return jnp.matmul(a, b, precision=_HIGHEST)

    for _ in range(iterations):
        t = 1.5 * eye - 0.5 * mm(p, y)
        p, y = mm(t, p), mm(y, t)
    return p * lax.rsqrt(trace)


def _group_moments(xg: Array, rows: Array | None) -> tuple[Array, Array, Array]:
    """``(count, mean, M2)`` of ``xg`` (``(..., M, G, c)``) over its positions ``M``: ``M2`` the
    (G, c, c) sums of outer products of the centred rows. The mean comes first and the outer
    products are of centred data, so a large mean costs nothing (no ``E[xx^T] - mu mu^T``)."""
    if rows is None:
        count = jnp.full(xg.shape[:-3], xg.shape[-3], xg.dtype)
    else:
        count = jnp.sum(rows, -1, dtype=xg.dtype)
        xg = jnp.where(rows[..., None, None], xg, 0)
    safe = jnp.maximum(count, 1)[..., None, None]
    mean = jnp.sum(xg, -3) / safe
    centered = xg - mean[..., None, :, :]
    if rows is not None:
        centered = jnp.where(rows[..., None, None], centered, 0)
    m2 = jnp.einsum("...mgi,...mgj->...gij", centered, centered, precision=_HIGHEST)
    return count, mean, m2


def _combine_group_moments(count: Array, mean: Array, m2: Array) -> tuple[Array, Array, Array]:
    """Chan's parallel formula along the leading (device) axis, for covariance matrices:
    ``M2 = sum_i M2_i + sum_i n_i (m_i - m)(m_i - m)^T``."""
    total = jnp.sum(count, 0)
    pivot = lax.stop_gradient(mean[jnp.argmax(count)])
    weight = count[:, None, None]
    combined = pivot + jnp.sum(weight * (mean - pivot), 0) / jnp.maximum(total, 1)
    d = mean - combined
    spread = jnp.einsum("d,dgi,dgj->gij", count, d, d, precision=_HIGHEST)
    return total, combined, jnp.sum(m2, 0) + spread


def _synced_group_moments(xg, rows, sync: _Sync):
    """:func:`_group_moments` over the global batch: every device's ``(count, mean, M2)`` in one
    ``psum`` (:func:`normzoo._stats.gather_all`), combined by Chan's formula."""
    count, mean, m2 = _group_moments(xg, rows)
    if sync.axis_name is None:
        return count, mean, m2
    flat = jnp.concatenate([count[None], jnp.ravel(mean), jnp.ravel(m2)])
    stacked, member = _stats.gather_all(flat, sync.axis_name, sync.groups, layer=sync.layer)
    n_i = stacked[:, 0]
    if member is not None:  # devices outside this group count for nothing
        n_i = jnp.where(member, n_i, 0)
    mean_i = jnp.reshape(stacked[:, 1:1 + mean.size], (-1,) + mean.shape)
    m2_i = jnp.reshape(stacked[:, 1 + mean.size:], (-1,) + m2.shape)
    return _combine_group_moments(n_i, mean_i, jnp.where(n_i[:, None, None, None] > 0, m2_i, 0))


def _valid_average(valid: Array, a: Array) -> Array:
    """The average of ``a`` over its leading axis where ``valid`` (zeros where none is)."""
    v = jnp.reshape(valid, valid.shape + (1,) * (a.ndim - 1))
    return jnp.sum(jnp.where(v, a, 0), 0) / jnp.maximum(jnp.sum(valid), 1)


def _iter_map(
    x: Array, mean: Array | None, whitening: Array | None, scale: Array | None, bias: Array | None, *,
    training: bool, group_size: int, iterations: int, momentum: float, epsilon: float, axis: Axes,
    mask: Array | None, axis_name: str | None, axis_index_groups: Any, virtual_batch_size: int | None,
    dtype: Any, layer: str,
) -> tuple[Array, WhiteningStats]:
    """IterNorm: ``(y, WhiteningStats)`` (see :func:`iter_norm`)."""
    if jnp.iscomplexobj(x):
        raise TypeError(
            f"{layer}: complex input (dtype {jnp.result_type(x)}) is not supported: whitening a complex "
            "signal needs the Hermitian covariance and its own Newton-Schulz iteration; whiten the real and "
            "imaginary parts as separate channels instead."
        )
    layout, groups, size = _whitening_layout(x, axis, virtual_batch_size if training else None, group_size, layer)
    (ax,) = layout.features
    channels = x.shape[ax]
    iterations = _check_iterations(iterations, layer)
    _check_features(layer, x, layout.features, "axis", mean=mean, scale=scale, bias=bias)
    if whitening is not None and tuple(jnp.shape(whitening)) != (groups, size, size):
        raise ValueError(
            f"{layer}: `whitening` has shape {tuple(jnp.shape(whitening))}, but {channels} channels in groups "
            f"of {size} (group_size={group_size}) need ({groups}, {size}, {size}): one matrix per group."
        )
    _check_momentum(momentum, layer=layer)
    rows = _row_mask(mask, x, ax, layer)
    nominal = _stats.stats_dtype(x.dtype, dtype)
    ghosts = layout.ghosts or 1
    # Channels last and split into groups, with a leading axis of ghost batches (1 without).
    xg = jnp.reshape(jnp.moveaxis(jnp.asarray(x, nominal), ax, -1), (ghosts, -1, groups, size))
    if rows is not None:
        rows = jnp.reshape(rows, (ghosts, -1))
    eye = jnp.eye(size, dtype=nominal)
    if training:
        if layout.ghosts is None:
            sync = _Sync(nominal, axis_name, axis_index_groups, layer)
            count, mu, m2 = (a[None] for a in _synced_group_moments(xg[0], None if rows is None else rows[0], sync))
        else:  # ghost statistics stay on each device (as batch_norm's)
            count, mu, m2 = _group_moments(xg, rows)
        has = (count > 0)[:, None, None, None]
        # An empty (fully masked) batch has no statistics: the neutral ones (mean 0, covariance I).
        mu = jnp.where(has[..., 0], mu, 0)
        sigma = jnp.where(has, m2 / jnp.maximum(count, 1)[:, None, None, None], eye) + epsilon * eye
        center = mu
        wm = newton_schulz_whitening(sigma, iterations)
        # The running statistics move toward the average over the (ghost) batches that hold data
        # and, with ghost batches and axis_name, over the devices (one more psum of the averages).
        valid = count > 0
        run_mean, run_w, any_valid = _valid_average(valid, mu), _valid_average(valid, wm), jnp.any(valid)
        if layout.ghosts is not None and axis_name is not None:
            parts = jnp.concatenate([jnp.ravel(run_mean), jnp.ravel(run_w), any_valid[None].astype(nominal)])
            stacked, member = _stats.gather_all(parts, axis_name, axis_index_groups, layer=layer)
            valid = stacked[:, -1] > 0
            if member is not None:
                valid = jnp.logical_and(valid, member)
            k = run_mean.size
            run_mean = _valid_average(valid, jnp.reshape(stacked[:, :k], (-1,) + run_mean.shape))
            run_w = _valid_average(valid, jnp.reshape(stacked[:, k:-1], (-1,) + run_w.shape))
            any_valid = jnp.any(valid)
        run_mean = jnp.reshape(run_mean, (channels,))
        if mean is None and whitening is None:  # no running statistics given: the batch's own
            stats = WhiteningStats(lax.stop_gradient(run_mean), lax.stop_gradient(run_w))
        else:
            stats = WhiteningStats(_ema(mean, run_mean, momentum, any_valid, nominal),
                                   _ema(whitening, run_w, momentum, any_valid, nominal))
    else:
        if mean is None or whitening is None:
            raise ValueError(
                f"{layer}: training=False whitens with the running statistics, but "
                f"{'`mean`' if mean is None else '`whitening`'} is None; pass the running statistics "
                "(or training=True to use the batch's)."
            )
        stats = WhiteningStats(mean, whitening)
        center = jnp.reshape(jnp.asarray(mean, nominal), (1, groups, size))
        wm = jnp.asarray(whitening, nominal)[None]
    centered = xg - center[:, None]
    y = jnp.einsum("bmgj,bgij->bmgi", centered, wm, precision=_HIGHEST)  # x_hat = (x - mu) W^T, per group
    moved = tuple(s for i, s in enumerate(x.shape) if i != ax) + (channels,)
    y = jnp.moveaxis(jnp.reshape(y, moved), -1, ax)
    if scale is not None:
        y = y * jnp.reshape(scale, layout.view)
    if bias is not None:
        y = y + jnp.reshape(bias, layout.view)
    return _output(y, x, scale, bias, dtype=dtype), stats


def iter_norm(
    x: Array, mean: Array | None = None, whitening: Array | None = None, scale: Array | None = None,
    bias: Array | None = None, *, training: bool, group_size: int = 64, iterations: int = 5,
    momentum: float = 0.99, epsilon: float = 1e-5, axis: int = -1, mask: Array | None = None,
    axis_name: str | None = None, axis_index_groups: Any = None, virtual_batch_size: int | None = None,
    dtype: Any = None,
) -> tuple[Array, WhiteningStats]:
    r"""Iterative normalization: ZCA whitening of groups of channels by Newton-Schulz iterations
    (Huang, Zhou, Zhu, Liu & Shao 2019, "Iterative Normalization: Beyond Standardization towards
    Efficient Whitening", CVPR, arXiv:1904.03441).

    The channels (``axis``) form groups of ``c = group_size`` consecutive channels (one group
    of all of them when there are fewer). In training, per group, over every other axis
    (``m`` positions):

    .. math::
        \mu = \mathrm{E}[x], \quad \Sigma = \tfrac1m (x - \mu)^\top (x - \mu) + \epsilon I, \quad
        \Sigma_N = \Sigma / \mathrm{tr}\,\Sigma

    .. math::
        P_0 = I, \quad P_k = \tfrac12 \big(3 P_{k-1} - P_{k-1}^3 \Sigma_N\big)\ (k = 1..T), \quad
        W = P_T / \sqrt{\mathrm{tr}\,\Sigma}

    .. math:: y = \gamma \odot \big((x - \mu) W^\top\big) + \beta

    ``W`` tends to :math:`\Sigma^{-1/2}` (ZCA whitening) as ``T = iterations`` grows; the paper's
    ``T = 5`` whitens only partly, on purpose (a stable gradient and some of BatchNorm's
    regularization). With ``training=False`` the running ``mean`` and ``whitening`` replace
    :math:`\mu` and ``W``. The running statistics move as BatchNorm's (flax's convention):
    ``mean = momentum * mean + (1 - momentum) * mu``, ``whitening = momentum * whitening +
    (1 - momentum) * W``.

    Statistics are computed in at least float32 (matrix products at full precision), the mean
    first and the covariance of centred data, so large means cost no accuracy; with
    ``axis_name`` every device's count, mean and centred sum of outer products travel in one
    ``psum`` and are combined by Chan's formula (count-weighted: masks and uneven batches give
    the statistics of the union). Complex inputs are rejected (``TypeError``).

    Args:
      x: the input (real).
      mean, whitening: running statistics, shapes ``(C,)`` and ``(C // c, c, c)``. In training
        they may be None: then the returned ones are this batch's :math:`\mu` and ``W``.
      scale, bias: ``gamma`` and ``beta``, per channel (None: absent).
      training: whiten with the batch's statistics (and update the running ones).
      group_size: ``c``, the channels whitened together (the paper's code's ``num_channels``);
        it must divide the number of channels unless it is at least as large.
      iterations: ``T``, the Newton-Schulz steps.
      momentum, epsilon: as :func:`batch_norm` (``epsilon I`` is added to the covariance).
      axis: the channel axis (one).
      mask: boolean, broadcastable to ``x`` and of size 1 along ``axis``: the positions that
        enter the statistics (every position is whitened).
      axis_name, axis_index_groups: combine the statistics across a mapped axis (groups of it).
      virtual_batch_size: ghost batches, as :func:`batch_norm` (each whitened by its own
        statistics; the running statistics take their average).
      dtype: the output dtype.

    Returns:
      ``(y, WhiteningStats(mean, whitening))``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (512, 3)) @ jnp.array([[2.0, 1, 0], [0, 1, 0], [0, 0, 3]]) + 1e4
      >>> y, (mean, w) = F.iter_norm(x, training=True, iterations=30)
      >>> cov = jnp.cov(y.T, bias=True)
      >>> bool(jnp.allclose(cov, jnp.eye(3), atol=1e-3)), mean.shape, w.shape
      (True, (3,), (1, 3, 3))
      >>> y_inference, _ = F.iter_norm(x, mean, w, training=False)   # with given (running) statistics
      >>> bool(jnp.allclose(y_inference, y, atol=1e-3))
      True
    """
    return _iter_map(x, mean, whitening, scale, bias, training=training, group_size=group_size,
                     iterations=iterations, momentum=momentum, epsilon=epsilon, axis=axis, mask=mask,
                     axis_name=axis_name, axis_index_groups=axis_index_groups,
                     virtual_batch_size=virtual_batch_size, dtype=dtype, layer="iter_norm")


def _instance_axes(x: Array, feature_axes: Axes, layer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    feat = _axes(x, feature_axes, "feature_axes", layer)
    if 0 in feat:
        raise ValueError(
            f"{layer}: feature_axes={feature_axes!r} includes axis 0. The channel axes cannot include the "
            "leading dimension as this is assumed to be the batch axis; name the channel axes only (e.g. -1)."
        )
    return feat, tuple(i for i in range(1, x.ndim) if i not in feat)


def _instance_map(x, scale, bias, mean, var, *, training, momentum, epsilon, feature_axes, mask, axis_name,
                  axis_index_groups, dtype, layer) -> tuple[AffineMap, BatchStats]:
    """InstanceNorm's map; with running statistics (``mean``, ``var`` given), their batch average
    is tracked in training and used otherwise."""
    feat, red = _instance_axes(x, feature_axes, layer)
    _check_features(layer, x, feat, "feature_axes", scale=scale, bias=bias, mean=mean, var=var)
    tracked = mean is not None or var is not None
    if tracked and not training:
        if mean is None or var is None:
            raise ValueError(f"{layer}: tracked statistics need both `mean` and `var`.")
        view = (1,) + _feature_shape(x, feat)  # instance statistics: (batch, *features)
        m, v = jnp.reshape(mean, view), jnp.reshape(var, view)
        return _per_feature_map(x, m, v, scale, bias, red, feat, epsilon, dtype), BatchStats(mean, var)
    mask = _stats.check_mask(mask, x, layer=layer)
    count, m, m2 = _stats.synced_moments(x, red, mask=mask, dtype=dtype, axis_name=axis_name,
                                         axis_index_groups=axis_index_groups, layer=layer)
    m, v = _normalizing_moments(count, m, m2)
    stats = BatchStats(None, None)
    if tracked:
        _check_momentum(momentum, layer=layer)
        # The average over the instances that hold any valid element.
        avg_mean, avg_var, n = _average_where(count > 0, m, v)
        nominal = _stats.stats_dtype(x.dtype, dtype)
        stats = BatchStats(_ema(mean, avg_mean, momentum, n > 0, nominal),
                           _ema(var, avg_var, momentum, n > 0, jnp.finfo(nominal).dtype))
    return _per_feature_map(x, m, v, scale, bias, red, feat, epsilon, dtype), stats


def instance_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, epsilon: float = 1e-6,
    feature_axes: Axes = -1, mask: Array | None = None, axis_name: str | None = None,
    axis_index_groups: Any = None, dtype: Any = None,
) -> Array:
    r"""Instance normalization (Ulyanov et al. 2016, arXiv:1607.08022).

    Each example and channel is normalized over the remaining (spatial) axes:

    .. math:: y_{n,\dots,c} = \gamma_c \frac{x_{n,\dots,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} + \beta_c

    ``feature_axes`` (default -1) must not include axis 0, the batch. See
    :func:`tracked_instance_norm` for PyTorch's running statistics.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> y = F.instance_norm(jax.random.normal(jax.random.key(0), (2, 5, 5, 3)) * 4 + 7)
      >>> round(float(jnp.abs(y.mean((1, 2))).max()), 4)
      0.0
    """
    amap, _ = _instance_map(x, scale, bias, None, None, training=True, momentum=0.0, epsilon=epsilon,
                            feature_axes=feature_axes, mask=mask, axis_name=axis_name,
                            axis_index_groups=axis_index_groups, dtype=dtype, layer="instance_norm")
    return amap(x)


def tracked_instance_norm(
    x: Array, mean: Array, var: Array, scale: Array | None = None, bias: Array | None = None, *,
    training: bool, momentum: float = 0.99, epsilon: float = 1e-6, feature_axes: Axes = -1,
    mask: Array | None = None, axis_name: str | None = None, axis_index_groups: Any = None,
    dtype: Any = None,
) -> tuple[Array, BatchStats]:
    r"""Instance normalization with running statistics (PyTorch's ``track_running_stats``).

    In training, :func:`instance_norm`, and the running ``mean`` and ``var`` move toward the
    batch average of the instance statistics; otherwise every instance is normalized by the
    running statistics, as BatchNorm at inference.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2)) + 3
      >>> y, stats = F.tracked_instance_norm(x, jnp.zeros(2), jnp.ones(2), training=True, momentum=0.0)
      >>> [round(float(m), 2) for m in stats.mean] == [round(float(m), 2) for m in x.mean((0, 1, 2))]
      True
    """
    amap, stats = _instance_map(x, scale, bias, mean, var, training=training, momentum=momentum, epsilon=epsilon,
                                feature_axes=feature_axes, mask=mask, axis_name=axis_name,
                                axis_index_groups=axis_index_groups, dtype=dtype, layer="tracked_instance_norm")
    return amap(x), stats


# ============================================================================= composite


def _ibn_map(x: Array, mask: Array | None, ratio: float, axis: Any, instance: Callable, batch: Callable,
             layer: str = "IBN") -> AffineMap:
    """IBN's map: ``instance(x[:k], mask, axis)`` on the first ``k = int(C * ratio)`` channels of
    ``axis``, ``batch(x[k:], mask)`` on the rest (each an :class:`AffineMap`), joined along
    ``axis``. Shared by :func:`ibn` and the linen and nnx layers, which differ only in where the
    parts' variables live."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"{layer}: ratio={ratio!r} must lie in [0, 1] (the fraction of channels that "
            "are instance-normalized; 0 is BatchNorm, 1 is InstanceNorm)."
        )
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"{layer}: axis={axis!r} must be a single int (the channel axis).")
    (axis,) = _stats.canonicalize_axes(x.ndim, int(axis), argument="axis", layer=layer)
    channels = x.shape[axis]
    k = int(channels * ratio)
    mask = _stats.check_mask(mask, x, layer=layer)
    parts = jnp.split(x, [k], axis)
    masks = (None, None) if mask is None else jnp.split(mask, [k], axis)
    maps = []
    if k > 0:
        maps.append(instance(parts[0], masks[0], axis))
    if k < channels:
        maps.append(batch(parts[1], masks[1]))
    if len(maps) == 1:
        return maps[0]
    return maps[0].join(maps[1], axis, x.ndim, k, channels)


def ibn(
    x: Array, mean: Array | None = None, var: Array | None = None, scale: Array | None = None,
    bias: Array | None = None, in_scale: Array | None = None, in_bias: Array | None = None, *,
    ratio: float = 0.5, training: bool, momentum: float = 0.99, epsilon: float = 1e-5, axis: int = -1,
    mask: Array | None = None, axis_name: str | None = None, axis_index_groups: Any = None,
    virtual_batch_size: int | None = None, dtype: Any = None,
) -> tuple[Array, BatchStats]:
    r"""Instance-Batch Normalization, IBN-a (Pan et al. 2018, arXiv:1807.09441).

    .. math:: y = \mathrm{concat}\big(\mathrm{IN}(x_{[:k]}),\ \mathrm{BN}(x_{[k:]})\big),\quad k = \lfloor C \cdot \mathrm{ratio} \rfloor

    along ``axis``: :func:`instance_norm` (``in_scale``, ``in_bias``, of ``k`` channels) on the
    first channels, :func:`batch_norm` (``mean``, ``var``, ``scale``, ``bias``, of ``C - k``) on the
    rest, applied in one pass. Returns ``(y, BatchStats)`` of the BatchNorm part.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
      >>> y, stats = F.ibn(x, jnp.zeros(4), jnp.ones(4), training=True)
      >>> y.shape, stats.mean.shape
      ((4, 6, 6, 8), (4,))
    """
    stats = []

    def instance(part, mask, axis):
        return _instance_map(part, in_scale, in_bias, None, None, training=True, momentum=0.0, epsilon=epsilon,
                             feature_axes=axis, mask=mask, axis_name=None, axis_index_groups=None, dtype=dtype,
                             layer="ibn")[0]

    def batch(part, mask):
        amap, new = _batch_map(part, mean, var, scale, bias, training=training, layer="ibn",
                               **_batch_options(momentum, epsilon, axis, mask, axis_name, axis_index_groups,
                                                virtual_batch_size, dtype))
        stats.append(new)
        return amap

    amap = _ibn_map(x, mask, ratio, axis, instance, batch, layer="ibn")
    return amap(x), stats[0] if stats else BatchStats(mean, var)


# ============================================================================= weight side


def _direction(v: Array, epsilon: float, mask: Array | None, dtype: Any,
               feature_axes: tuple[int, ...] | None = None) -> Array:
    """``v / ||v||`` (masked) in ``dtype``, the norm over every axis but ``feature_axes`` (default:
    the last, the units)."""
    vf = jnp.asarray(v, dtype) if mask is None else jnp.asarray(v, dtype) * mask
    kept = (vf.ndim - 1,) if feature_axes is None else feature_axes
    axes = tuple(a for a in range(vf.ndim) if a not in kept)
    return vf * lax.rsqrt(jnp.sum(_stats.abs_sq(vf), axes, keepdims=True) + epsilon)


def weight_norm(v: Array, g: Array, *, epsilon: float = 1e-12, mask: Array | None = None, dtype: Any = None,
                feature_axes: Axes = -1) -> Array:
    r"""The weight-normalized kernel (Salimans & Kingma 2016, arXiv:1602.07868).

    .. math:: w = g \frac{v}{\lVert v \rVert}

    with ``||v||`` the norm over every axis of ``v`` but ``feature_axes`` (default: the last, a
    Dense kernel's output units, so over a convolution's spatial and input axes), of
    ``v * mask`` with ``mask``; ``g`` has the feature axes' sizes (``()`` for
    ``feature_axes=()`` or None: one norm over all of ``v``). Computed in at least float32
    (``dtype`` raises it); use the result as any kernel, e.g. ``x @ weight_norm(v, g) + b`` or
    :func:`conv`.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> F.weight_norm(jnp.array([[3.0, 1.0], [4.0, 0.0]]), jnp.array([10.0, 2.0])).tolist()
      [[6.0, 2.0], [8.0, 0.0]]
    """
    axes = () if feature_axes is None else _stats.canonicalize_axes(
        jnp.ndim(v), feature_axes, argument="feature_axes", layer="weight_norm")
    want = tuple(jnp.shape(v)[a] for a in axes)
    if jnp.shape(g) != want:
        raise ValueError(
            f"weight_norm: `g` has shape {tuple(jnp.shape(g))}, but `v` of shape {tuple(jnp.shape(v))} has "
            f"{want} along feature_axes={feature_axes!r}; give g the shape {want}."
        )
    if mask is not None and jnp.shape(mask) != jnp.shape(v):
        raise ValueError(
            f"weight_norm: `mask` has shape {tuple(jnp.shape(mask))}, but `v` has shape {tuple(jnp.shape(v))}; "
            "give the mask the kernel's shape."
        )
    dt = _stats.stats_dtype(jnp.result_type(v) if dtype is None else dtype)
    view = [1] * jnp.ndim(v)
    for a, n in zip(axes, want):
        view[a] = n
    return _direction(v, epsilon, mask, dt, axes) * jnp.reshape(jnp.asarray(g, dt), view)


def conv_spectral_norm(
    kernel: Array, u: Array, *, n_steps: int = 1, epsilon: float = 1e-12, strides: Any = 1, padding: Any = "SAME",
    input_dilation: Any = 1, kernel_dilation: Any = 1, feature_group_count: int = 1, dtype: Any = None,
) -> SpectralNormOut:
    r"""Spectral normalization by the operator norm of the convolution itself (Miyato et al.
    2018 reshape the kernel into a matrix, whose norm only bounds the convolution's: Sedghi et
    al. 2019, arXiv:1805.10408; Gouk et al. 2021).

    .. math:: \bar W = W / \sigma(W), \qquad \sigma(W) = \max_{\lVert x \rVert = 1} \lVert \mathrm{conv}(x, W) \rVert

    estimated by ``n_steps`` power iterations on the convolution and its transpose
    (``v = l2n(conv(u)), u = l2n(conv^T(v))``) from ``u``, an input-shaped vector
    ``(1, *spatial, in)`` (one example of the input the layer sees: the norm depends on the
    input size and the padding). The convolution is :func:`conv`'s, with its options. No
    gradient through ``u``, ``v``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> kernel = jnp.ones((3, 3, 1, 1))       # a 3x3 box filter: gain 9 on a constant image
      >>> out = F.conv_spectral_norm(kernel, jnp.ones((1, 8, 8, 1)), n_steps=50, padding="CIRCULAR")
      >>> round(float(out.sigma), 3)
      9.0
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
        raise ValueError(f"conv_spectral_norm: n_steps={n_steps!r} must be an int >= 1 (the power iterations).")
    w = jnp.asarray(kernel)
    if jnp.ndim(u) != w.ndim or jnp.shape(u)[0] != 1 or jnp.shape(u)[-1] != w.shape[-2] * feature_group_count:
        raise ValueError(
            f"conv_spectral_norm: u has shape {tuple(jnp.shape(u))}; for a kernel of shape {w.shape} it must be one "
            f"input example, (1, *spatial, {w.shape[-2] * feature_group_count})."
        )
    options = dict(strides=strides, padding=padding, input_dilation=input_dilation, kernel_dilation=kernel_dilation,
                   feature_group_count=feature_group_count)
    wf = jnp.asarray(w, jnp.promote_types(w.dtype, jnp.float32))
    op = lambda a: conv(a, wf, **options)  # noqa: E731
    u0 = jnp.asarray(u, wf.dtype)
    v0 = u0  # set by the first iteration (n_steps >= 1)
    for _ in range(n_steps):
        v0 = _l2_normalize(op(u0), epsilon)
        (back,) = jax.vjp(op, u0)[1](v0)
        u0 = _l2_normalize(back, epsilon)
    u0, v0 = lax.stop_gradient(u0), lax.stop_gradient(v0)
    sigma = jnp.sum(v0 * op(u0))
    w_bar = w / jnp.where(sigma != 0, sigma, 1)
    out = flax_dtypes.canonicalize_dtype(kernel, sigma, dtype=dtype)
    return SpectralNormOut(jnp.asarray(w_bar, out), u0, sigma)


def weight_standardize(
    kernel: Array, gain: Array | None = None, *, scale: float = 1.0, epsilon: float = 1e-6,
    mask: Array | None = None, dtype: Any = None,
) -> Array:
    r"""Weight standardization (Qiao et al. 2019, arXiv:1903.10520): each output unit's weights
    (the last axis) standardized over the others (the fan-in), as timm's ``StdConv2d`` and,
    with ``gain`` and ``scale``, NF-Nets' ``ScaledStdConv2d`` (Brock et al. 2021).

    .. math:: \hat w = \mathrm{gain} \cdot \mathrm{scale} \cdot \frac{w - \mathrm{E}[w]}{\sqrt{\mathrm{Var}[w] + \epsilon}}

    with the (biased) mean and variance over every axis but the last (of ``kernel * mask``), in
    at least float32 (``dtype`` raises it). NF-Nets take ``scale = gamma / sqrt(fan_in)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> F.weight_standardize(jnp.array([[1.0, 10.0], [3.0, 30.0]]), epsilon=0.0).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
    """
    k = jnp.asarray(kernel)
    if k.ndim < 2:
        raise ValueError(f"weight_standardize: the kernel has shape {k.shape}; it needs a fan-in axis and an output "
                         "axis (last).")
    if gain is not None and jnp.shape(gain) != k.shape[-1:]:
        raise ValueError(f"weight_standardize: `gain` has shape {tuple(jnp.shape(gain))}; the kernel of shape "
                         f"{k.shape} has {k.shape[-1]} outputs (its last axis): give gain the shape {k.shape[-1:]}.")
    if mask is not None:
        k = k * mask
    dt = _stats.stats_dtype(k.dtype, dtype)
    k = jnp.asarray(k, dt)
    mean, var = _stats.moments(k, tuple(range(k.ndim - 1)), layer="weight_standardize")
    w = (k - mean) * (lax.rsqrt(var + epsilon) * scale)
    return w if gain is None else w * jnp.asarray(gain, dt)


class SpectralNormOut(NamedTuple):
    """:func:`spectral_norm`'s result: the normalized kernel, the new power-iteration vector and
    the estimated largest singular value."""

    kernel: Array
    u: Array
    sigma: Array


def _l2_normalize(x: Array, epsilon: float) -> Array:
    return x * lax.rsqrt(jnp.sum(x * x) + epsilon)


def spectral_norm(
    kernel: Array, u: Array, *, n_steps: int = 1, epsilon: float = 1e-12, dtype: Any = None,
    error_on_non_matrix: bool = False, exact: bool = False, layer: str = "spectral_norm",
) -> SpectralNormOut:
    r"""Spectral normalization of a kernel (Miyato et al. 2018, arXiv:1802.05957).

    .. math:: \bar W = W / \sigma(W), \qquad \sigma(W) \approx v^\top W u

    with ``W`` the kernel as a matrix (every axis but the last flattened, e.g. a convolution's
    ``(kh * kw * in, out)``) and ``u`` (shape ``(1, out)``) refined by ``n_steps`` power
    iterations ``v = l2n(u W^T), u = l2n(v W)``, ``l2n(a) = a / sqrt(|a|^2 + epsilon)``, no
    gradient through ``u`` or ``v`` (flax.linen.SpectralNorm's arithmetic). ``exact=True``
    takes :math:`\sigma` as the largest singular value (an SVD: small kernels) and still
    returns the iterated ``u``. A zero ``sigma`` leaves the kernel as it is. The result has the
    kernel's shape, in the promotion of the kernel's, ``u``'s and float32 (``dtype`` overrides).

    Args:
      kernel: at least 2-D; more axes are flattened into the first unless
        ``error_on_non_matrix``, which raises for them.
      u: the power-iteration vector, ``(1, out)``.
      n_steps: power iterations, at least 1.
      epsilon: added inside the square roots of the normalizations.
      dtype: the result's dtype.

    Returns:
      ``SpectralNormOut(kernel, u, sigma)``: feed ``u`` back in at the next step.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> out = F.spectral_norm(jnp.diag(jnp.array([3.0, 1.0])), jnp.ones((1, 2)), n_steps=20)
      >>> round(float(out.sigma), 4), [[round(float(w), 4) for w in row] for row in out.kernel]
      (3.0, [[1.0, 0.0], [0.0, 0.3333]])
    """
    w = jnp.asarray(kernel)
    if w.ndim < 2:
        raise ValueError(f"{layer}: the kernel has shape {w.shape}; spectral normalization needs at least 2 axes.")
    if w.ndim > 2:
        if error_on_non_matrix:
            raise ValueError(
                f"{layer}: Input is {w.ndim}D but error_on_non_matrix is True (a kernel of shape {w.shape}); "
                "pass error_on_non_matrix=False to normalize it as a matrix of its last axis."
            )
        w = jnp.reshape(w, (-1, w.shape[-1]))
    if tuple(jnp.shape(u)) != (1, w.shape[-1]):
        raise ValueError(
            f"{layer}: u has shape {tuple(jnp.shape(u))}; for a kernel with {w.shape[-1]} outputs (its last "
            f"axis) it must be {(1, w.shape[-1])}."
        )
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
        raise ValueError(f"{layer}: n_steps={n_steps!r} must be an int >= 1 (the power iterations).")
    u0 = jnp.asarray(u)
    v0 = u0
    for _ in range(n_steps):
        v0 = _l2_normalize(jnp.matmul(u0, w.T), epsilon)
        u0 = _l2_normalize(jnp.matmul(v0, w), epsilon)
    u0, v0 = lax.stop_gradient(u0), lax.stop_gradient(v0)
    if exact:
        sigma = jnp.linalg.norm(jnp.asarray(w, jnp.promote_types(w.dtype, jnp.float32)), 2)
    else:
        sigma = jnp.matmul(jnp.matmul(v0, w), u0.T)[0, 0]
    w_bar = jnp.reshape(w / jnp.where(sigma != 0, sigma, 1), jnp.shape(kernel))
    out = flax_dtypes.canonicalize_dtype(kernel, u0, v0, sigma, dtype=dtype)
    return SpectralNormOut(jnp.asarray(w_bar, out), u0, sigma)


def _dense(x: Array, kernel: Array, precision: Any = None, dot_general: Any = None) -> Array:
    dot = dot_general or lax.dot_general
    return dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _add_bias(y: Array, bias: Array | None) -> Array:
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _cosine(x: Array, kernel: Array, scale: Array | None, bias: Array | None, epsilon: float, op: Callable,
            patch_sumsq: Callable, dtype: Any, promote: bool = True) -> Array:
    """``scale * op(x, w) / (||w|| ||x_patch||) + bias`` per output unit (and patch); ``promote=False``
    where the caller has promoted ``x`` and ``kernel`` itself (a layer's ``promote_dtype``)."""
    x_, k_ = flax_dtypes.promote_dtype(x, kernel, dtype=dtype) if promote else (x, kernel)
    dot = op(x_, k_)
    sdt = _stats.stats_dtype(dot.dtype)
    kf = jnp.asarray(k_, sdt)
    inv_w = lax.rsqrt(jnp.sum(_stats.abs_sq(kf), tuple(range(kf.ndim - 1))) + epsilon)
    inv_x = lax.rsqrt(patch_sumsq(jnp.asarray(x_, sdt), kf.shape) + epsilon)
    y = jnp.asarray(dot, sdt) * inv_w * inv_x
    if scale is not None:
        y = y * scale
    return _add_bias(jnp.asarray(y, dot.dtype), None if bias is None else jnp.asarray(bias, dot.dtype))


def _check_kernel(layer: str, x: Array, kernel: Array, bias: Array | None, in_features: int) -> None:
    if jnp.ndim(kernel) < 2 or jnp.shape(kernel)[-2] != in_features:
        raise ValueError(
            f"{layer}: `kernel` of shape {tuple(jnp.shape(kernel))} does not take the input of shape "
            f"{tuple(x.shape)} ({in_features} input features per kernel, its second-to-last axis)."
        )
    if bias is not None and jnp.shape(bias) != jnp.shape(kernel)[-1:]:
        raise ValueError(
            f"{layer}: `bias` has shape {tuple(jnp.shape(bias))}, but the kernel has "
            f"{jnp.shape(kernel)[-1]} output features; give it shape {tuple(jnp.shape(kernel)[-1:])}."
        )


def _check_scalar(layer: str, scale: Array | None) -> None:
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(
            f"{layer}: `scale` must be a scalar (one temperature for every output), got shape "
            f"{tuple(jnp.shape(scale))}; pass a 0-d array."
        )


def cosine_dense(
    x: Array, kernel: Array, scale: Array | None = None, bias: Array | None = None, *,
    epsilon: float = 1e-12, precision: Any = None, dot_general: Any = None, dtype: Any = None,
) -> Array:
    r"""Cosine normalization of a dense layer (Luo et al. 2017, arXiv:1702.05870).

    .. math:: y_j = s \frac{w_j \cdot x}{\lVert w_j \rVert \, \lVert x \rVert} + b_j

    ``kernel`` is ``(in, out)``; ``scale`` an optional scalar ``s`` (a temperature); ``bias``
    optional, one per output.
    Each output is the cosine between the input and the unit's weights.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> F.cosine_dense(jnp.array([[3.0, 4.0]]), jnp.array([[1.0, 0.0], [0.0, 2.0]])).tolist()
      [[0.6000000238418579, 0.800000011920929]]
    """
    if x.ndim < 1:
        raise ValueError("cosine_dense: expected an input of rank >= 1 (features last), got a scalar.")
    _check_kernel("cosine_dense", x, kernel, bias, x.shape[-1])
    _check_scalar("cosine_dense", scale)
    op = lambda a, k: _dense(a, k, precision, dot_general)  # noqa: E731
    sumsq = lambda a, kernel_shape: jnp.sum(_stats.abs_sq(a), -1, keepdims=True)  # noqa: E731
    return _cosine(x, kernel, scale, bias, epsilon, op, sumsq, dtype)


# --------------------------------------------------------------------------- convolutions

_PADDINGS = ("SAME", "VALID", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL")  # flax.linen.Conv's


class _Geometry(NamedTuple):
    """An input prepared for ``lax.conv_general_dilated`` as flax.linen.Conv prepares it."""

    x: Array  # one leading batch axis, explicit padding modes already applied
    batch_shape: tuple[int, ...] | None  # the original batch axes, restored on the output
    kernel_shape: tuple[int, ...]
    conv: dict  # keyword arguments of the convolution

    def restore(self, y: Array) -> Array:
        return y if self.batch_shape is None else jnp.reshape(y, self.batch_shape + y.shape[1:])


def _conv_geometry(x: Array, features: int, kernel_size: Any, *, strides: Any = 1, padding: Any = "SAME",
                   input_dilation: Any = 1, kernel_dilation: Any = 1, feature_group_count: int = 1,
                   mask: Array | None = None, precision: Any = None, layer: str) -> _Geometry:
    """flax.linen.Conv's reading of its fields for input ``x``, with clear errors."""
    from flax.linen.linear import canonicalize_padding

    ks = (kernel_size,) if isinstance(kernel_size, numbers.Integral) else tuple(kernel_size)
    n = len(ks)
    if x.ndim < n + 1:
        raise ValueError(
            f"{layer}: kernel_size={kernel_size!r} convolves {n} spatial axes, which needs an "
            f"input of rank >= {n + 1} (features last), got shape {tuple(x.shape)}."
        )

    def per_axis(value, argument):
        value = 1 if value is None else value
        if isinstance(value, numbers.Integral):
            return (int(value),) * n
        value = tuple(value)
        if len(value) != n:
            raise ValueError(f"{layer}: `{argument}`={value!r} must be an int or {n} ints, one per spatial axis.")
        return value

    strides, lhs_dil = per_axis(strides, "strides"), per_axis(input_dilation, "input_dilation")
    rhs_dil = per_axis(kernel_dilation, "kernel_dilation")
    batch_shape = None
    if x.ndim != n + 2:  # flax folds any number of batch axes into one
        batch_shape = x.shape[: x.ndim - n - 1]
        x = jnp.reshape(x, (-1,) + x.shape[x.ndim - n - 1:])
    if isinstance(padding, str) and padding.upper() not in _PADDINGS:
        raise ValueError(
            f"{layer}: padding={padding!r} is not supported; use one of {', '.join(map(repr, _PADDINGS))}, "
            "an int, or one (low, high) pair per spatial axis."
        )
    given = padding
    try:
        padding = canonicalize_padding(padding, n)
    except ValueError:
        raise ValueError(
            f"{layer}: padding={given!r} must give one int or (low, high) pair per "
            f"spatial axis ({n})."
        ) from None
    if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
        # Explicit padding modes pad the input and convolve VALID, as flax does.
        span = [(k - 1) * d + 1 for k, d in zip(ks, rhs_dil)]
        padding = padding.upper()
        if padding == "CAUSAL":
            if n != 1:
                raise ValueError(f"{layer}: padding='CAUSAL' is only defined for 1-D convolutions, got kernel_size={ks}.")
            x = jnp.pad(x, [(0, 0), (span[0] - 1, 0), (0, 0)])
        else:
            widths = [(0, 0)] + [((s - 1) // 2, s // 2) for s in span] + [(0, 0)]
            x = jnp.pad(x, widths, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    groups = feature_group_count
    if x.shape[-1] % groups or features % groups:
        raise ValueError(
            f"{layer}: feature_group_count={groups} must divide the {x.shape[-1]} input and "
            f"{features} output features."
        )
    kernel_shape = ks + (x.shape[-1] // groups, features)
    if mask is not None and tuple(mask.shape) != kernel_shape:
        raise ValueError(
            f"{layer}: `mask` has shape {tuple(mask.shape)}, but the kernel has shape "
            f"{kernel_shape}; give the mask the kernel's shape."
        )
    spec = (0, n + 1) + tuple(range(1, n + 1))
    dn = lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=(n + 1, n) + tuple(range(n)), out_spec=spec)
    conv_args = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                     dimension_numbers=dn, feature_group_count=groups, precision=precision)
    return _Geometry(x, batch_shape, kernel_shape, conv_args)


def _convolve(geometry: _Geometry, x: Array, kernel: Array, conv_general_dilated: Any = None) -> Array:
    return (conv_general_dilated or lax.conv_general_dilated)(x, kernel, **geometry.conv)


def _patch_sumsq(geometry: _Geometry, x: Array, kernel_shape, mask: Array | None, groups: int) -> Array:
    """``||x_p||^2`` of every output unit's patch, without extracting patches: ``|x|^2``
    convolved with ones over the kernel's support (its mask, its feature group)."""
    sq = _stats.abs_sq(x)
    if mask is not None:  # each unit has its own support
        return _convolve(geometry, sq, jnp.asarray(mask != 0, sq.dtype))
    # One box filter per feature group, repeated over the group's units.
    ones = jnp.ones(tuple(kernel_shape[:-1]) + (groups,), sq.dtype)
    return jnp.repeat(_convolve(geometry, sq, ones), kernel_shape[-1] // groups, axis=-1)


def _conv_kernel_geometry(x, kernel, bias, strides, padding, input_dilation, kernel_dilation,
                          feature_group_count, mask, precision, layer) -> _Geometry:
    if jnp.ndim(kernel) < 3:
        raise ValueError(f"{layer}: `kernel` must be (*kernel_size, in_features // groups, out_features), "
                         f"got shape {tuple(jnp.shape(kernel))}.")
    geometry = _conv_geometry(x, jnp.shape(kernel)[-1], tuple(jnp.shape(kernel)[:-2]), strides=strides,
                              padding=padding, input_dilation=input_dilation, kernel_dilation=kernel_dilation,
                              feature_group_count=feature_group_count, mask=mask, precision=precision, layer=layer)
    if tuple(jnp.shape(kernel)) != geometry.kernel_shape:
        raise ValueError(f"{layer}: `kernel` has shape {tuple(jnp.shape(kernel))}, but the input of shape "
                         f"{tuple(x.shape)} needs {geometry.kernel_shape}.")
    _check_kernel(layer, geometry.x, kernel, bias, geometry.kernel_shape[-2])
    return geometry


def conv(
    x: Array, kernel: Array, bias: Array | None = None, *, strides: Any = 1, padding: Any = "SAME",
    input_dilation: Any = 1, kernel_dilation: Any = 1, feature_group_count: int = 1,
    mask: Array | None = None, precision: Any = None, conv_general_dilated: Any = None, dtype: Any = None,
) -> Array:
    """``flax.linen.Conv``'s arithmetic as a function: ``x`` (batch..., spatial..., in) convolved
    with ``kernel`` ``(*kernel_size, in / feature_group_count, out)``, plus ``bias``.

    Every ``flax.linen.Conv`` option with its meaning: ``padding`` ``'SAME'``, ``'VALID'``,
    ``'SAME_LOWER'``, ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``, ints or pairs; dilations;
    feature groups; ``mask`` multiplies the kernel. With :func:`weight_norm` it is a
    weight-normalized convolution.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jnp.arange(5.0).reshape(1, 5, 1)
      >>> F.conv(x, jnp.ones((3, 1, 1)), padding="CIRCULAR")[0, :, 0].tolist()
      [5.0, 3.0, 6.0, 9.0, 7.0]
    """
    geometry = _conv_kernel_geometry(x, kernel, bias, strides, padding, input_dilation, kernel_dilation,
                                     feature_group_count, mask, precision, "conv")
    if mask is not None:
        kernel = kernel * mask
    gx, kernel, bias = flax_dtypes.promote_dtype(geometry.x, kernel, bias, dtype=dtype)
    return geometry.restore(_add_bias(_convolve(geometry, gx, kernel, conv_general_dilated), bias))


def cosine_conv(
    x: Array, kernel: Array, scale: Array | None = None, bias: Array | None = None, *, strides: Any = 1,
    padding: Any = "SAME", input_dilation: Any = 1, kernel_dilation: Any = 1, feature_group_count: int = 1,
    mask: Array | None = None, precision: Any = None, epsilon: float = 1e-12, conv_general_dilated: Any = None,
    dtype: Any = None,
) -> Array:
    r"""Cosine normalization of a convolution (Luo et al. 2017, arXiv:1702.05870).

    .. math:: y_{p,j} = s \frac{w_j \cdot x_p}{\lVert w_j \rVert \, \lVert x_p \rVert} + b_j

    where ``x_p`` is output position ``p``'s receptive-field patch (within the unit's feature
    group, under its ``mask``); ``||x_p||`` is computed by box-filtering ``|x|^2`` with the
    convolution's geometry, never by extracting patches. Options as :func:`conv`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo import functional as F
      >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
      >>> y = F.cosine_conv(x, jax.random.normal(jax.random.key(1), (3, 3, 3, 4)))
      >>> y.shape, bool(jnp.all(jnp.abs(y) <= 1.0))
      ((2, 6, 6, 4), True)
    """
    geometry = _conv_kernel_geometry(x, kernel, bias, strides, padding, input_dilation, kernel_dilation,
                                     feature_group_count, mask, precision, "cosine_conv")
    _check_scalar("cosine_conv", scale)
    if mask is not None:
        kernel = kernel * mask
    op = lambda a, k: _convolve(geometry, a, k, conv_general_dilated)  # noqa: E731
    sumsq = lambda a, kernel_shape: _patch_sumsq(geometry, a, kernel_shape, mask, feature_group_count)  # noqa: E731
    return geometry.restore(_cosine(geometry.x, kernel, scale, bias, epsilon, op, sumsq, dtype))
