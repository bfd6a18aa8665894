"""Batch-statistics family as flax.linen modules: BatchNorm, BatchRenorm, MeanOnlyBatchNorm,
LpBatchNorm, NoisyBatchNorm.

Each layer declares its variables, calls its function in :mod:`normzoo.functional` and writes
the new running statistics back (not while initializing). ``__call__`` applies the layer's map
to ``x``; ``affine_map`` returns the map itself (IBN and deployment code use it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from normzoo import functional as F
from normzoo._stats import AffineMap

Array = jax.Array
Initializer = Any


class _Options(TypedDict):
    """The batch functions' shared keyword arguments, as the fields give them."""

    momentum: float
    epsilon: float
    axis: Any
    mask: Array | None
    axis_name: str | None
    axis_index_groups: Any
    virtual_batch_size: int | None
    dtype: Any
    layer: str


class _Shell(nn.Module):
    """What every linen shell does with its variables: nowrap helpers, invisible to flax's
    introspection (``nn.tabulate`` shows one call per layer)."""

    @nn.nowrap
    def _affine(self, shape: tuple[int, ...], *, use_bias: bool | None = None) -> tuple[Array | None, Array | None]:
        """``scale`` and ``bias`` (created in that order, as flax does; None where unused).
        ``force_float32_reductions=False`` casts them to ``param_dtype`` (flax's meaning). With
        ``scale_plus_one`` the parameter is the offset ``gamma - 1`` (initialized at 0 where
        ``scale_init`` is left at its default, ones) and the scale returned is ``1 + scale``."""
        out = []
        use_bias = self.use_bias if use_bias is None else use_bias
        plus_one = getattr(self, "scale_plus_one", False)
        scale_init = initializers.zeros if plus_one and self.scale_init is initializers.ones else self.scale_init
        for use, name, init in ((self.use_scale, "scale", scale_init), (use_bias, "bias", self.bias_init)):
            p = self.param(name, init, shape, self.param_dtype) if use else None
            if p is not None and not getattr(self, "force_float32_reductions", True):
                p = jnp.asarray(p, self.param_dtype)
            out.append(p)
        scale, bias = out
        return (None if scale is None else 1 + scale) if plus_one else scale, bias

    @nn.nowrap
    def _running(self, shape: tuple[int, ...], names=("mean", "var")) -> list[Any]:
        """The running statistics (flax's ``batch_stats`` ``mean`` 0 and ``var`` 1), float32, or
        ``param_dtype`` with ``force_float32_reductions=False``."""
        dtype = jnp.float32 if getattr(self, "force_float32_reductions", True) else self.param_dtype
        fill = {"mean": 0.0, "var": 1.0}
        return [self.variable("batch_stats", n, lambda s, f=fill[n]: jnp.full(s, f, dtype), shape) for n in names]

    @nn.nowrap
    def _read(self, variables, training: bool) -> list[Array | None]:
        """The running statistics' values; at inference with ``force_float32_reductions=False`` in
        ``param_dtype``, as flax normalizes with them."""
        values = [None if v is None else v.value for v in variables]
        if training or getattr(self, "force_float32_reductions", True):
            return values
        return [a if a is None or not jnp.issubdtype(jnp.result_type(a), jnp.floating)
                else jnp.asarray(a, self.param_dtype) for a in values]

    @nn.nowrap
    def _store(self, variables, new, x: Array, training: bool) -> None:
        """Writes the new running statistics of a training call (never while initializing). With
        ``force_float32_reductions=False`` they keep flax's dtype: the variable's, promoted with
        that of the input's statistics (``dtype``, else the input's)."""
        if not training or self.is_initializing():
            return
        for v, value in zip(variables, new):
            if value is None:
                continue
            if not getattr(self, "force_float32_reductions", True) and jnp.issubdtype(value.dtype, jnp.inexact):
                nominal = jnp.result_type(x) if self.dtype is None else jnp.dtype(self.dtype)
                dtype = jnp.promote_types(jnp.result_type(v.value), nominal)
                value = jnp.asarray(value, dtype if jnp.iscomplexobj(value) else jnp.finfo(dtype).dtype)
            v.value = value


class _Mapped(_Shell):
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

    @nn.nowrap
    def _features(self, x: Array) -> tuple[int, ...]:
        return F._layout(x, self.axis, None, type(self).__name__).shape

    @nn.nowrap
    def _options(self, mask: Array | None) -> _Options:
        """The function's keyword arguments, from the fields. Under ``init`` the mapped axis
        need not exist yet (flax does the same)."""
        return _Options(momentum=self.momentum, epsilon=self.epsilon, axis=self.axis, mask=mask,
                        axis_name=None if self.is_initializing() else self.axis_name,
                        axis_index_groups=self.axis_index_groups, virtual_batch_size=self.virtual_batch_size,
                        dtype=self.dtype, layer=type(self).__name__)


class _FlaxBatchFields(_Mapped):
    """flax.linen.BatchNorm's fields in flax's order with flax's defaults."""

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


class _BatchFields(_FlaxBatchFields):
    """flax.linen.BatchNorm's fields, then ours (keyword-only)."""

    virtual_batch_size: int | None = dataclasses.field(default=None, kw_only=True)
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)


class BatchNorm(_BatchFields):
    r"""Batch normalization (Ioffe & Szegedy 2015, arXiv:1502.03167); drop-in for ``flax.linen.BatchNorm``.

    In training, with :math:`\mu_B` and :math:`\sigma_B^2` the mean and (biased) variance of the
    batch over every axis except ``axis``:

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    and the running statistics are updated as ``r = momentum * r + (1 - momentum) * b``.
    With ``use_running_average=True`` the running statistics replace the batch ones. The
    arithmetic is :func:`normzoo.functional.batch_norm`.

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
    ``axis_name=None``: the compiler reduces across devices itself. A feature that the
    mask empties is normalized by the neutral statistics (mean 0, variance 1), not ``x/√ε``.

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
      scale_plus_one: (keyword-only) store the scale as an offset from 1: the layer
        multiplies by ``1 + scale`` and the default ``scale_init`` (ones) becomes zeros, so
        it starts at 1 (praxis' and Gemma's convention; a checkpoint stored that way loads
        unchanged). Every layer with a ``scale`` has this field.
    """

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        shape = self._features(x)
        running = self._running(shape)
        scale, bias = self._affine(shape)
        mean, var = self._read(running, not use_ra)
        amap, new = F._batch_map(x, mean, var, scale, bias, training=not use_ra, **self._options(mask))
        self._store(running, new, x, not use_ra)
        return amap


class BatchRenorm(_BatchFields):
    r"""Batch renormalization (Ioffe 2017, arXiv:1702.03275).

    In training, with batch statistics :math:`\mu_B, \sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and
    running statistics :math:`\mu, \sigma = \sqrt{\mathrm{var} + \epsilon}`:

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
    d_max=0`` this layer equals :class:`BatchNorm`. ``init`` has no running statistics yet and
    normalizes as BatchNorm. The arithmetic is :func:`normzoo.functional.batch_renorm`.

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
        shape = self._features(x)
        running = self._running(shape) + [self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))]
        scale, bias = self._affine(shape)
        mean, var, steps = self._read(running, not use_ra)
        amap, new = F._renorm_map(
            x, mean, var, steps, scale, bias, training=not use_ra, r_max=self.r_max, d_max=self.d_max,
            warmup_steps=self.warmup_steps, warmup_schedule=self.warmup_schedule,
            correct=not self.is_initializing(), **self._options(mask),
        )
        self._store(running, new, x, not use_ra)
        return amap


class FrozenBatchNorm(_FlaxBatchFields):
    r"""Frozen batch normalization: fixed statistics and affine, for fine-tuning (torchvision's
    ``FrozenBatchNorm2d``, timm's ``freeze_batch_norm_2d``, the detection backbones).

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with the stored running statistics :math:`\mu, \sigma^2` in training as at inference,
    nothing updated, and no gradient to :math:`\mu, \sigma^2, \gamma, \beta`. Its fields,
    call arguments and variables are :class:`BatchNorm`'s (``params/{scale,bias}``,
    ``batch_stats/{mean,var}``), so a trained BatchNorm's checkpoint loads unchanged and a
    model switches to it by its class or by ``normzoo.make("frozen_batch")``;
    ``use_running_average`` (field or call), ``momentum``, ``axis_name`` and
    ``axis_index_groups`` are accepted and have no effect. :func:`normzoo.deploy.fold` folds it
    like BatchNorm. The arithmetic is :func:`normzoo.functional.frozen_batch_norm`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
      >>> trained = normzoo.BatchNorm(use_running_average=False)
      >>> variables = trained.init(jax.random.key(1), x)
      >>> _, updates = trained.apply(variables, x, mutable=["batch_stats"])
      >>> variables = {**variables, **updates}
      >>> frozen = normzoo.FrozenBatchNorm(use_running_average=False)
      >>> y, after = frozen.apply(variables, x, mutable=["batch_stats"])   # "training": nothing moves
      >>> want = normzoo.BatchNorm(use_running_average=True).apply(variables, x)
      >>> bool(jnp.allclose(y, want)), jax.tree.all(jax.tree.map(jnp.array_equal, after, {"batch_stats": variables["batch_stats"]}))
      (True, True)

    Attributes:
      use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
        bias_init, scale_init, axis_name, axis_index_groups, use_fast_variance,
        force_float32_reductions: :class:`BatchNorm`'s, in flax's order (see above for the
        ones without effect).
      scale_plus_one: (keyword-only) as :class:`BatchNorm`.
    """

    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        shape = self._features(x)
        mean, var = self._read(self._running(shape), False)
        scale, bias = self._affine(shape)
        return F._frozen_map(x, mean, var, scale, bias, epsilon=self.epsilon, axis=self.axis, dtype=self.dtype,
                             layer=type(self).__name__)


class MeanOnlyBatchNorm(_BatchFields):
    r"""Mean-only batch normalization (Salimans & Kingma 2016, arXiv:1602.07868, sec. 3.2).

    Subtracts the batch mean (running mean at inference) and adds a learned bias; no
    division by the standard deviation. The WeightNorm paper pairs it with weight-normalized
    layers: the weight norm fixes the scale, the mean-only BatchNorm centres activations.
    The arithmetic is :func:`normzoo.functional.mean_only_batch_norm`.

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
        shape = self._features(x)
        running = self._running(shape, names=("mean",))
        scale, bias = self._affine(shape)
        (mean,) = self._read(running, not use_ra)
        amap, new = F._batch_map(x, mean, None, scale, bias, training=not use_ra, divide=False,
                                 **self._options(mask))
        self._store(running, new, x, not use_ra)
        return amap


class NoisyBatchNorm(BatchNorm):
    r"""BatchNorm followed by noise that shifts every activation's distribution at every step
    ("noisy" BatchNorm of Santurkar et al. 2018, arXiv:1805.11604, sec. 2.1).

    In training each feature ``j`` (channel) draws, at every call, the parameters of its
    noise, :math:`\mu_j \sim U(-\mathrm{shift\_range}, \mathrm{shift\_range})` and :math:`\sigma_j \sim
    U(\mathrm{scale\_range})`; then every activation ``i`` (example and position) of that
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
    before the noise. The arithmetic is :func:`normzoo.functional.noisy_batch_norm`.

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
      shift_range: (keyword-only) :math:`\mu_j` is drawn from ``U(-shift_range, shift_range)``.
      scale_range: (keyword-only) ``(low, high)``: :math:`\sigma_j` is drawn from ``U(low, high)``.
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
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        shape = self._features(x)
        running = self._running(shape)
        scale, bias = self._affine(shape)
        noisy = not use_ra and not self.is_initializing()
        mean, var = self._read(running, not use_ra)
        amap, new = F._noisy_map(
            x, mean, var, scale, bias, training=not use_ra,
            key=self.make_rng(self.rng_collection) if noisy else None, shift_range=self.shift_range,
            scale_range=self.scale_range, noise_width=self.noise_width, **self._options(mask),
        )
        self._store(running, new, x, not use_ra)
        return amap


class LpBatchNorm(BatchNorm):
    r"""Batch normalization by the batch's Lp deviation (Santurkar et al. 2018, arXiv:1805.11604, sec. 3.3).

    Centred by the batch mean :math:`\mu_B` and divided by a deviation ``s_p`` of the batch
    (over every axis except ``axis``):

    .. math::
        s_1 = \sqrt{\pi/2}\; \mathrm{E}\,|x - \mu_B|, \qquad
        s_2 = \sqrt{\mathrm{E}\,|x - \mu_B|^2}, \qquad
        s_\infty = \max |x - \mu_B|

    .. math:: y = \gamma \frac{x - \mu_B}{\sqrt{s_p^2 + \epsilon}} + \beta

    ``s_1`` is scaled so that it equals the standard deviation for Gaussian data; ``s_2`` is
    the standard deviation (``p=2`` is :class:`BatchNorm`); :math:`s_\infty` is the largest
    deviation, unscaled, so L∞ outputs lie in [-1, 1] before ``scale`` and ``bias``. The
    running averages keep ``batch_stats/mean`` and ``batch_stats/var = s_p^2`` (BatchNorm's
    variables and update rule), and inference uses them as BatchNorm does, so the layer
    folds, converts and checkpoints like BatchNorm. The arithmetic is
    :func:`normzoo.functional.lp_batch_norm`.

    With ``axis_name`` the statistics are those of the union of the devices' batches (masks
    count-weighted): ``p=2`` and ``p=inf`` with one collective (each device's count, mean,
    M2, maximum and minimum: :math:`s_\infty = \max(\max x - \mu, \mu - \min x)`); ``p=1`` needs
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
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        shape = self._features(x)
        running = self._running(shape)
        scale, bias = self._affine(shape)
        mean, var = self._read(running, not use_ra)
        amap, new = F._lp_map(x, mean, var, scale, bias, p=self.p, training=not use_ra, **self._options(mask))
        self._store(running, new, x, not use_ra)
        return amap


class EvoNormB0(_Shell):
    r"""EvoNorm-B0 (Liu et al. 2020, arXiv:2004.02967); timm's ``EvoNorm2dB0``, channels last.

    .. math:: y = \gamma \frac{x}{\max\big(\sqrt{\sigma^2_{B,c} + \epsilon},\ v x + \sqrt{\sigma^2_{n,c} + \epsilon}\big)} + \beta

    a normalization-activation layer: the batch's variance per channel (in training; the
    running ``batch_stats/var`` at inference, synced across ``axis_name`` as BatchNorm's) against
    each example's own, gated by a learned ``v`` (registry ``evonorm_b0``). The running variance
    is biased and uses flax's momentum, as :class:`BatchNorm` (timm stores the unbiased one with
    PyTorch's momentum). The arithmetic is :func:`normzoo.functional.evonorm_b0`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2 + 1e4
      >>> layer = normzoo.EvoNormB0(use_running_average=False)
      >>> variables = layer.init(jax.random.key(1), x)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(variables['params']), sorted(updates['batch_stats']), bool(jnp.isfinite(y).all())
      (['bias', 'scale', 'v'], ['var'], True)

    Attributes:
      use_running_average: normalize by the running variance (may be given at call time).
      momentum: decay of the running variance.
      epsilon: added to both variances (timm's default).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as :class:`BatchNorm`.
      axis_name, axis_index_groups: as :class:`BatchNorm`.
      use_v: the gate ``v`` and the normalization (timm's ``apply_act``); False: affine only.
      v_init: its initializer (ones).
      virtual_batch_size, scale_plus_one: (keyword-only) as :class:`BatchNorm`.
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_v: bool = True
    v_init: Initializer = initializers.ones
    virtual_batch_size: int | None = dataclasses.field(default=None, kw_only=True)
    scale_plus_one: bool = dataclasses.field(default=False, kw_only=True)

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Applies EvoNorm-B0 to ``x`` (channels last): with the batch's variance (the running
        one updated) or, if ``use_running_average``, the running one."""
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if x.ndim < 2:
            raise ValueError(f"EvoNormB0: x has shape {x.shape}; it needs a batch axis and a channel axis (last).")
        shape = (x.shape[-1],)
        running = self._running(shape, names=("var",))
        scale, bias = self._affine(shape)
        v = self.param("v", self.v_init, shape, self.param_dtype) if self.use_v else None
        (var,) = self._read(running, not use_ra)
        y, new = F._evonorm_b0_map(
            x, var, scale, bias, v, training=not use_ra, momentum=self.momentum, epsilon=self.epsilon, mask=mask,
            axis_name=None if self.is_initializing() else self.axis_name, axis_index_groups=self.axis_index_groups,
            virtual_batch_size=self.virtual_batch_size, dtype=self.dtype, layer="EvoNormB0",
        )
        self._store(running, [new], x, not use_ra)
        return y
