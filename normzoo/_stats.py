"""The one statistics helper shared by every normalization layer.

Everything that computes a mean or a variance goes through :func:`moments`, and
everything that turns statistics into an output goes through :func:`normalize`.

Numerics (why it looks the way it does):

* Statistics are computed in at least float32, whatever the input dtype.
* Each device first computes *local* statistics ``(count, mean, M2)`` with shifted
  sums (the corrected algorithm of Chan, Golub & LeVeque 1983): a pilot value ``p``
  per output, then ``s1 = sum(x - p)`` and ``s2 = sum((x - p)**2)`` in one fused
  pass; ``mean = p + s1/n`` and ``M2 = s2 - s1**2/n``. The relative error of ``M2``
  grows like ``1 + (mean - p)**2 / var`` instead of ``1 + mean**2 / var`` for the
  fast variance ``E[x^2] - E[x]^2`` (which loses every digit for x ~ N(1e4, 1)).
  The pilot is the mean of the first slice along the innermost reduced axis (e.g.
  column 0 of every image of a BatchNorm batch, the first feature of a LayerNorm
  row): an average of data points, so ``(mean - p)**2 <= (n - 1) var`` even in the
  worst case, it costs a fraction ``1/shape[axis]`` of a pass, and for typical data
  it lies within a few standard deviations of the mean. The batch axis (axis 0)
  is never sliced, because that is the axis sharded across devices; when it is the
  only reduced axis (BatchNorm on (N, C)), and when a mask may make the first
  slice padding, the pilot is the exact mean instead (one more pass).
* On XLA:CPU a reduction of ``x - p`` costs an extra written-out pass, so there the
  statistics start from the plain sums ``sum(x)``, ``sum(x**2)`` and check them: if
  any ``mean**2 > 16 var`` (a mean beyond 4 standard deviations, where the fast
  variance could lose more than ~4 bits) a ``lax.cond`` redoes the shifted sums around
  that mean, which is then accurate to float32 rounding. Typical activations never
  take the second pass; x ~ N(1e4, 1) always does. Under pmap and shard_map the check
  is per device, before any communication; under jit with a batch-sharded input
  (simulated CPU devices) checking per-example statistics adds one scalar all-reduce.
  Other backends fuse the subtraction into the reduction, so they always take the one
  shifted pass (:func:`checked_fast_sums` says which path is in use).
* The derivatives of the statistics are written out (``dmean = dx/n``,
  ``dM2 = 2 (x - mean) dx``, :func:`local_moments`), not traced through these choices.
  The output map ``y = (x - mean) * mul + add`` is applied as ``x * mul + (add - mean
  * mul)`` when the same 4-standard-deviation check holds (:class:`AffineMap`), so that
  its backward pass needs only plain sums too. Both are ordinary JAX (``custom_jvp``,
  ``lax.cond``): forward mode (``jax.jvp``, ``jax.hessian``) works as for flax.
* Across devices (``axis_name`` set) every device writes its triple into its own
  slot of a zero array and a single ``psum`` hands every device all the triples
  (adding zeros is exact). Each device then combines them with Chan's parallel
  formula ``M2 = sum_i M2_i + sum_i n_i (m_i - m)^2``. This is one all-reduce per
  call, stays stable for large means (no device ever subtracts squares of large
  numbers), and weights every device by its number of valid elements, so masks
  and uneven batches give the statistics of the union of valid elements (the
  scheme of PyTorch's SyncBatchNorm, which all-gathers mean/var/count).
  ``axis_index_groups`` become a static membership mask over the slots, which
  works under ``shard_map`` too (``psum`` with groups does not), and without
  groups ``shard_map`` can infer that the statistics are replicated.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as flax_dtypes
from jax import lax

Array = jax.Array
Axes = int | Sequence[int]

_UNBOUND_AXIS_HELP = (
    "`axis_name` only has a meaning inside a mapped context that names that axis: "
    "`jax.pmap(..., axis_name={name!r})` or `jax.shard_map(..., mesh=...)` over a mesh "
    "axis called {name!r}. Under plain `jax.jit` with inputs sharded by `NamedSharding`, "
    "leave `axis_name=None`: the compiler already reduces the statistics across devices."
)


def canonicalize_axes(rank: int, axes: Axes, *, argument: str, layer: str) -> tuple[int, ...]:
    """Returns sorted, non-negative axes, raising a clear error for bad ones."""
    if isinstance(axes, numbers.Integral):
        axes = (int(axes),)
    if not isinstance(axes, Sequence) or not all(isinstance(a, numbers.Integral) for a in axes):
        raise TypeError(
            f"{layer}: `{argument}` must be an int or a sequence of ints, got {axes!r}."
        )
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"{layer}: `{argument}`={tuple(axes)!r} is out of range for an input of "
                f"rank {rank}; use axes in [{-rank}, {rank - 1}] (negative values count "
                "from the last axis)."
            )
    out = tuple(sorted(int(a) % rank for a in axes))
    if len(set(out)) != len(out):
        raise ValueError(
            f"{layer}: `{argument}`={tuple(axes)!r} names the same axis twice; "
            "list each axis once."
        )
    return out


def stats_dtype(x_dtype: Any, dtype: Any = None) -> Any:
    """The dtype statistics are computed in: at least float32."""
    base = jnp.result_type(x_dtype) if dtype is None else jnp.dtype(dtype)
    return jnp.promote_types(base, jnp.float32)


def check_mask(mask: Array | None, x: Array, *, layer: str) -> Array | None:
    """Validates a boolean mask broadcastable to ``x`` and broadcasts it."""
    if mask is None:
        return None
    mask_dtype = getattr(mask, "dtype", None)
    if mask_dtype is None or jnp.dtype(mask_dtype) != jnp.bool_:
        raise TypeError(
            f"{layer}: `mask` must be a boolean array, got dtype {mask_dtype}; "
            "pass `mask.astype(bool)` (True marks the positions that enter the statistics)."
        )
    try:
        shape = jnp.broadcast_shapes(mask.shape, x.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{layer}: `mask` of shape {tuple(mask.shape)} does not broadcast to the "
            f"input of shape {tuple(x.shape)}; give it the input's shape, or size-1 "
            "dimensions where it is shared (e.g. (batch, 1, 1, 1) to mask whole examples)."
        )
    return jnp.broadcast_to(mask, x.shape)


def _check_groups(axis_name: str, axis_index_groups: Any, *, layer: str) -> int:
    """Returns the size of ``axis_name``, raising clear errors for bad axes and groups."""
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{layer}: axis_name={axis_name!r} is not bound here. "
            + _UNBOUND_AXIS_HELP.format(name=axis_name)
        ) from None
    if axis_index_groups is None:
        return size
    try:
        groups = [[int(i) for i in g] for g in axis_index_groups]
    except TypeError:
        raise TypeError(
            f"{layer}: `axis_index_groups` must be a list of lists of device indices, "
            f"got {axis_index_groups!r}."
        ) from None
    flat = sorted(i for g in groups for i in g)
    sizes = {len(g) for g in groups}
    if flat != list(range(size)) or len(sizes) != 1:
        raise ValueError(
            f"{layer}: axis_index_groups={groups!r} must split the {size} indices of axis "
            f"{axis_name!r} into groups of equal size, each index in exactly one group "
            f"(e.g. {[list(range(0, size // 2)), list(range(size // 2, size))]!r})."
        )
    return size


def gather_all(
    x: Array, axis_name: str, axis_index_groups: Any = None, *, layer: str
) -> tuple[Array, Array | None]:
    """Every device's ``x`` stacked on a new leading axis, with one ``psum``.

    Returns ``(stacked, member)``: ``stacked[i]`` is device ``i``'s ``x`` (shape
    ``(axis_size,) + x.shape``) and ``member`` a boolean ``(axis_size,)`` mask of the
    devices in this device's group (None without groups: every device).
    """
    size = _check_groups(axis_name, axis_index_groups, layer=layer)
    idx = lax.axis_index(axis_name)
    mine = jnp.arange(size) == idx
    # `where`, not a one-hot product: a NaN/inf on one device must not leak into other slots.
    slots = jnp.where(jnp.reshape(mine, (size,) + (1,) * x.ndim), x[None], jnp.zeros_like(x)[None])
    stacked = lax.psum(slots, axis_name)
    if axis_index_groups is None:
        return stacked, None
    table = np.zeros((size, size), bool)
    for g in axis_index_groups:
        table[np.ix_(list(g), list(g))] = True
    return stacked, jnp.asarray(table)[idx]


def _member_view(member: Array | None, like: Array) -> Array | None:
    return None if member is None else jnp.reshape(member, (-1,) + (1,) * (like.ndim - 1))


def group_mean(stacked: Array, member: Array | None) -> Array:
    """Mean over the leading (device) axis of ``stacked``, within this device's group."""
    if member is None:
        return jnp.mean(stacked, 0)
    w = _member_view(member, stacked).astype(stacked.dtype)
    return jnp.sum(stacked * w, 0) / jnp.sum(member)


# Where the fast formulas are trusted: every |mean| <= _SPREAD standard deviations.
# There E[x^2] - E[x]^2 and sum(dy*x) - mean*sum(dy) lose at most log2(1 + 4**2) ~ 4 bits
# to cancellation, about what float32 summation loses anyway.
_SPREAD = 4.0


def checked_fast_sums() -> bool:
    """Whether statistics take the checked fast sums (see the module notes).

    True on XLA:CPU, whose reductions of ``x`` or ``x * y`` run at memory speed but which
    writes ``x - mean`` out in full before reducing it. Other backends fuse that
    subtraction into the reduction, so the shifted sums cost nothing extra there and
    no data-dependent branch (a host round trip on GPU; a collective for per-example
    statistics of a batch-sharded input under jit) is worth taking.
    """
    return jax.default_backend() == "cpu"


def local_moments(
    x: Array, axes: tuple[int, ...], mask: Array | None, use_mean: bool
) -> tuple[Array, Array, Array]:
    """Per-device ``(count, mean, M2)`` over ``axes`` (reduced away), in x's dtype.

    ``M2`` is the sum of squared deviations from ``mean``; with ``use_mean=False``
    ``mean`` is zero and ``M2`` is the plain sum of squares (RMSNorm). The derivative
    is defined analytically (``dmean = dx/n``, ``dM2 = 2 (x - mean) dx``), so the
    backward pass never sees how the statistics were computed.
    """
    return _local_moments(x, mask, axes, use_mean)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _local_moments(x, mask, axes, use_mean):
    if mask is None:
        n = math.prod(x.shape[a] for a in axes)
        count = jnp.full(
            tuple(s for i, s in enumerate(x.shape) if i not in axes), n, x.dtype
        )

        def rsum(v):
            return jnp.sum(v, axes)

    else:
        count = jnp.sum(mask, axes, dtype=x.dtype)

        def rsum(v):
            return jnp.sum(jnp.where(mask, v, 0), axes)

    # An all-masked slice has no statistics; dividing by 1 keeps them finite (0).
    safe = jnp.maximum(count, 1)
    if not use_mean:
        return count, jnp.zeros_like(count), rsum(x * x)

    def shifted(pilot):
        d = x - jnp.expand_dims(pilot, axes)
        s1, s2 = rsum(d), rsum(d * d)
        # s2 - s1^2/n is >= 0 in exact arithmetic; clip round-off so rsqrt never sees < 0.
        return pilot + s1 / safe, jnp.maximum(s2 - s1 * s1 / safe, 0.0)

    if checked_fast_sums():
        # The fast sums, checked. Where a mean is large against its spread, a second
        # pass around the (accurate) fast mean corrects both.
        s1, s2 = rsum(x), rsum(x * x)
        mean = s1 / safe
        m2 = jnp.maximum(s2 - s1 * mean, 0.0)
        fast = jnp.all(mean * mean * count <= _SPREAD**2 * m2)
        mean, m2 = lax.cond(fast, lambda: (mean, m2), lambda: shifted(mean))
    elif mask is None and axes[-1] != 0:
        # One shifted pass around the mean of the first slice along the innermost axis.
        first = lax.slice_in_dim(x, 0, 1, axis=axes[-1])
        mean, m2 = shifted(jnp.mean(first, axes))
    else:  # padding, or the sharded batch axis: shift by the exact mean (one more pass)
        mean, m2 = shifted(rsum(x) / safe)
    return count, mean, m2


@_local_moments.defjvp
def _local_moments_jvp(axes, use_mean, primals, tangents):
    x, mask = primals
    dx = tangents[0]
    count, mean, m2 = out = _local_moments(x, mask, axes, use_mean)
    centered = x - jnp.expand_dims(mean, axes) if use_mean else x
    w, wc = dx, dx * centered
    if mask is not None:
        w, wc = jnp.where(mask, w, 0), jnp.where(mask, wc, 0)
    dmean = jnp.sum(w, axes) / jnp.maximum(count, 1) if use_mean else jnp.zeros_like(mean)
    return out, (jnp.zeros_like(count), dmean, 2 * jnp.sum(wc, axes))


def combine_moments(count: Array, mean: Array, m2: Array, axis: int = 0):
    """Chan's parallel combination of ``(count, mean, M2)`` triples along ``axis``."""
    total = jnp.sum(count, axis)
    safe = jnp.maximum(total, 1)
    # Pivot on the largest part's mean so that the weighted sum only adds small numbers.
    pivot = lax.stop_gradient(
        jnp.take_along_axis(mean, jnp.argmax(count, axis, keepdims=True), axis)
    )
    combined = jnp.squeeze(pivot, axis) + jnp.sum(count * (mean - pivot), axis) / safe
    spread = jnp.sum(count * jnp.square(mean - jnp.expand_dims(combined, axis)), axis)
    return total, combined, jnp.sum(m2, axis) + spread


def synced_moments(
    x: Array,
    axes: Axes,
    *,
    mask: Array | None = None,
    use_mean: bool = True,
    dtype: Any = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    layer: str = "moments",
) -> tuple[Array, Array, Array]:
    """``(count, mean, M2)`` of ``x`` over ``axes``, combined across ``axis_name``.

    The building block of :func:`moments`; layers that merge statistics further (GroupNorm
    merges the channels of a group) combine these triples with :func:`combine_moments`.
    """
    axes = canonicalize_axes(x.ndim, axes, argument="axes", layer=layer)
    x = jnp.asarray(x, stats_dtype(x.dtype, dtype))
    mask = check_mask(mask, x, layer=layer)
    count, mean, m2 = local_moments(x, axes, mask, use_mean)
    if axis_name is not None:
        stacked, member = gather_all(
            jnp.stack([count, mean, m2]), axis_name, axis_index_groups, layer=layer
        )
        n_i = stacked[:, 0]
        if member is not None:  # devices outside this group count for nothing
            n_i = jnp.where(_member_view(member, n_i), n_i, 0)
        count, mean, m2 = combine_moments(n_i, stacked[:, 1], jnp.where(n_i > 0, stacked[:, 2], 0))
    return count, mean, m2


def moments(
    x: Array,
    axes: Axes,
    *,
    mask: Array | None = None,
    use_mean: bool = True,
    dtype: Any = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    layer: str = "moments",
) -> tuple[Array, Array]:
    """Mean and (biased) variance of ``x`` over ``axes``, stable and device-synced.

    Args:
      x: input array, any float dtype.
      axes: axes to reduce over (removed from the outputs).
      mask: optional boolean array broadcastable to ``x``; only True positions count.
      use_mean: if False the mean is zero and the "variance" is the mean square.
      dtype: minimal dtype of the statistics (promoted to at least float32).
      axis_name: mapped axis to reduce over as well (pmap / shard_map), with one
        ``psum``.
      axis_index_groups: optional partition of ``axis_name``'s indices; statistics
        are combined within each group only.
      layer: name used in error messages.

    Returns:
      ``(mean, var)``, each of x's shape with ``axes`` removed, in the stats dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo._stats import moments
      >>> mean, var = moments(jnp.array([[1e4, 1e4 + 2.0]]), axes=1)
      >>> float(mean[0]), float(var[0])
      (10001.0, 1.0)
    """
    count, mean, m2 = synced_moments(
        x, axes, mask=mask, use_mean=use_mean, dtype=dtype, axis_name=axis_name,
        axis_index_groups=axis_index_groups, layer=layer,
    )
    return mean, m2 / jnp.maximum(count, 1)


def sync_batch_stats(batch_stats: Any, axis_name: str, axis_index_groups: Any = None) -> Any:
    """Averages running statistics across devices, for training without synced BN.

    Call it inside ``pmap`` / ``shard_map`` (e.g. before evaluation or checkpointing) so that
    every replica holds the same ``batch_stats``. Float leaves are averaged with one
    ``psum`` for the whole tree; integer leaves (BatchRenorm's step counter) take the
    maximum with a second one. Outside a mapped context, on the stacked per-device
    statistics that ``pmap`` returns, the equivalent is ``jax.tree.map(lambda a: a.mean(0), s)``.

    Args:
      batch_stats: the ``batch_stats`` collection (any pytree of arrays).
      axis_name: the mapped axis holding the replicas.
      axis_index_groups: optional partition of the axis; averages within each group.

    Returns:
      The same pytree, identical on every device of a group.
    """
    leaves, treedef = jax.tree.flatten(batch_stats)
    out = list(leaves)
    for is_float in (True, False):
        idx = [i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.floating) == is_float]
        if not idx:
            continue
        dt = jnp.float32 if is_float else jnp.int32
        flat = jnp.concatenate([jnp.ravel(leaves[i]).astype(dt) for i in idx])
        stacked, member = gather_all(flat, axis_name, axis_index_groups, layer="sync_batch_stats")
        if is_float:
            reduced = group_mean(stacked, member)
        else:
            lowest = jnp.iinfo(dt).min
            reduced = jnp.max(stacked if member is None else jnp.where(member[:, None], stacked, lowest), 0)
        start = 0
        for i in idx:
            a = leaves[i]
            out[i] = jnp.reshape(reduced[start:start + a.size], a.shape).astype(a.dtype)
            start += a.size
    return jax.tree.unflatten(treedef, out)


def param_with_shape(mdl, name: str, init, shape: tuple[int, ...], dtype, *, what: str):
    """``mdl.param`` that explains a shape mismatch with existing variables."""
    if mdl.has_variable("params", name):
        existing = tuple(mdl.get_variable("params", name).shape)
        if existing != tuple(shape):
            raise ValueError(
                f"{type(mdl).__name__}: the input has {what} {tuple(shape)}, but the existing "
                f"params[{name!r}] has shape {existing}. These variables were created for a "
                f"different input; re-run `init` with the new input shape, or feed inputs "
                f"whose {what} is {existing}."
            )
    return mdl.param(name, init, tuple(shape), dtype)


def variable_with_shape(mdl, collection: str, name: str, init, shape, *, what: str):
    """``mdl.variable`` for running statistics, with the same mismatch check."""
    if mdl.has_variable(collection, name):
        existing = tuple(mdl.get_variable(collection, name).shape)
        if existing != tuple(shape):
            raise ValueError(
                f"{type(mdl).__name__}: the input has {what} {tuple(shape)}, but the existing "
                f"{collection}[{name!r}] has shape {existing}. Re-run `init` with the new "
                f"input shape, or feed inputs whose {what} is {existing}."
            )
    return mdl.variable(collection, name, init, tuple(shape))


class AffineMap(NamedTuple):
    """``y = ((x - mean) * mul + add).astype(dtype)``: a normalizer with its statistics folded in.

    ``mean``, ``mul`` and ``add`` broadcast against the input (``add`` may be None). Layers
    built from others (IBN) collect their parts' maps and apply them in one pass over ``x``.

    ``small_mean`` (a scalar bool, or None for "unknown") says that every ``|mean|`` is
    within ``_SPREAD`` standard deviations of the data. Then the map is applied as
    ``x * mul + (add - mean * mul)``, whose backward pass takes ``sum(dy * (x - mean))``
    as ``sum(dy * x) - mean * sum(dy)``: plain reductions, no ``x - mean`` pass, and at
    most ~4 bits lost to cancellation. Otherwise (a ``lax.cond`` picks) it is applied as
    written, recomputing ``x - mean`` in the backward pass rather than storing it. Maps as
    large as ``x`` (LayerNorm's per-row statistics times per-feature scale) have no such
    sums and are always applied as written.
    """

    mean: Array
    mul: Array
    add: Array | None
    dtype: Any
    small_mean: Array | None = None

    def __call__(self, x: Array) -> Array:
        x = jnp.asarray(x, self.mean.dtype)
        parts = [jnp.shape(a) for a in (self.mean, self.mul, self.add) if a is not None]
        args = (x, self.mean, self.mul, self.add)
        if self.small_mean is None or math.prod(jnp.broadcast_shapes(*parts)) >= x.size:
            y = _centered(*args)
        else:
            y = lax.cond(self.small_mean, _shortcut, jax.checkpoint(_centered), *args)
        return jnp.asarray(y, self.dtype)


def _centered(x, mean, mul, add):
    y = (x - mean) * mul
    return y if add is None else y + add


def _shortcut(x, mean, mul, add):
    offset = -mean * mul
    return x * mul + (offset if add is None else add + offset)


def normalize(
    mdl,
    x: Array,
    mean: Array,
    inv: Array,
    *,
    param_shape: tuple[int, ...],
    param_view: tuple[int, ...],
    dtype: Any,
    param_dtype: Any,
    use_bias: bool,
    use_scale: bool,
    bias_init,
    scale_init,
    offset: Array | None = None,
    return_map: bool = False,
) -> Array | AffineMap:
    """``y = (x - mean) * inv * scale + offset * scale + bias`` in the stats dtype.

    ``mean``, ``inv`` (1/sqrt(var + eps), possibly times BatchRenorm's r) and ``offset``
    (BatchRenorm's d) broadcast against ``x``; the learned ``scale`` and ``bias``
    have ``param_shape`` and are reshaped to ``param_view`` to broadcast. The
    result dtype follows flax.linen: ``dtype`` if given, else the promotion of
    the input and the parameters used. With ``return_map`` the :class:`AffineMap`
    is returned instead of being applied to ``x``.
    """
    mul = inv
    args = [x]
    scale = None
    if use_scale:
        scale = param_with_shape(
            mdl, "scale", scale_init, param_shape, param_dtype, what="feature shape"
        )
        args.append(scale)
        scale = jnp.reshape(scale, param_view)
        mul = mul * scale
    add = None
    if offset is not None:
        add = offset if scale is None else offset * scale
    if use_bias:
        bias = param_with_shape(
            mdl, "bias", bias_init, param_shape, param_dtype, what="feature shape"
        )
        args.append(bias)
        bias = jnp.reshape(bias, param_view)
        add = bias if add is None else add + bias
    small_mean = None
    if checked_fast_sums():
        small_mean = jnp.all(lax.stop_gradient(jnp.abs(mean * inv)) <= _SPREAD)
    amap = AffineMap(
        mean, mul, add, flax_dtypes.canonicalize_dtype(*args, dtype=dtype), small_mean
    )
    return amap if return_map else amap(x)


def expand(stat: Array, axes: tuple[int, ...]) -> Array:
    """Re-inserts reduced ``axes`` as size-1 dimensions so ``stat`` broadcasts."""
    return jnp.expand_dims(stat, axes)


def feature_view(rank: int, feature_axes: tuple[int, ...], shape) -> tuple[int, ...]:
    """The broadcastable shape of per-feature parameters for an input of ``rank``."""
    view = [1] * rank
    for a in feature_axes:
        view[a] = shape[a]
    return tuple(view)


__all__ = [
    "AffineMap",
    "canonicalize_axes",
    "check_mask",
    "combine_moments",
    "gather_all",
    "group_mean",
    "expand",
    "feature_view",
    "local_moments",
    "moments",
    "normalize",
    "param_with_shape",
    "stats_dtype",
    "synced_moments",
    "sync_batch_stats",
    "variable_with_shape",
]
