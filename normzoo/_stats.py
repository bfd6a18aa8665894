"""The one statistics core shared by every normalization layer.

Everything that computes a mean or a variance goes through :func:`synced_moments` (or
:func:`moments`), and everything that turns statistics into an output goes through
:class:`AffineMap`.

Numerics (why it looks the way it does):

* Statistics are computed in at least float32, whatever the input dtype. Complex inputs
  have a complex mean and the real variance ``E|x - mean|^2`` (flax's definition).
* Each device first computes *local* statistics ``(count, mean, M2)`` with shifted
  sums (the corrected algorithm of Chan, Golub & LeVeque 1983): a pilot value ``p``
  per output, then ``s1 = sum(x - p)`` and ``s2 = sum(|x - p|^2)`` in one fused
  pass; ``mean = p + s1/n`` and ``M2 = s2 - |s1|^2/n``. The relative error of ``M2``
  grows like ``1 + |mean - p|^2 / var`` instead of ``1 + |mean|^2 / var`` for the
  fast variance ``E|x|^2 - |E x|^2`` (which loses every digit for x ~ N(1e4, 1)).
  The pilot is the mean of the first slice along the innermost reduced axis (e.g.
  column 0 of every image of a BatchNorm batch, the first feature of a LayerNorm
  row): an average of data points, so ``|mean - p|^2 <= (n - 1) var`` even in the
  worst case, it costs a fraction ``1/shape[axis]`` of a pass, and for typical data
  it lies within a few standard deviations of the mean. The batch axis (axis 0)
  is never sliced, because that is the axis sharded across devices; when it is the
  only reduced axis (BatchNorm on (N, C)), and when a mask may make the first
  slice padding, the pilot is the exact mean instead (one more pass).
* **Two paths, chosen in one place** (:func:`by_platform`, with
  ``jax.lax.platform_dependent``: by the platform the computation is lowered for). XLA:CPU
  does not fuse ``x - p`` into a reduction (it writes the difference out first), so there
  the statistics start from the plain sums ``sum(x)``, ``sum(|x|^2)`` and check them: if
  any ``|mean|^2 > 16 var`` (a mean beyond 4 standard deviations, where the fast variance
  could lose more than ~4 bits) a ``lax.cond`` redoes the shifted sums around that mean,
  which is then accurate to float32 rounding. Typical activations never take the second
  pass; x ~ N(1e4, 1) always does. Every other platform fuses the subtraction, so it
  takes the one shifted pass and never branches on data. The check is per device, before
  any communication; under ``jax.vmap`` it is taken once for the whole mapped batch (a
  ``custom_vmap`` predicate), so the ``lax.cond`` stays a branch instead of becoming a
  select that runs both sides.
* The derivatives of the statistics are written out (``dmean = dx/n``,
  ``dM2 = 2 Re(conj(x - mean) dx)``), not traced through these choices. On the checked
  path the output map ``y = (x - mean) * mul + add`` is applied as ``x * mul + (add -
  mean * mul)`` when the same 4-standard-deviation check holds (:class:`AffineMap`), so
  that its backward pass needs only plain sums too. All of it is ordinary JAX
  (``custom_jvp``, ``lax.cond``): forward mode (``jax.jvp``, ``jax.hessian``) works as
  for flax.
* Across devices (``axis_name`` set) every device writes its triple into its own
  slot of a zero array and a single ``psum`` hands every device all the triples
  (adding zeros is exact). Each device then combines them with Chan's parallel
  formula ``M2 = sum_i M2_i + sum_i n_i |m_i - m|^2``. This is one all-reduce per
  call, stays stable for large means (no device ever subtracts squares of large
  numbers), and weights every device by its number of valid elements, so masks
  and uneven batches give the statistics of the union of valid elements (the
  scheme of PyTorch's SyncBatchNorm, which all-gathers mean/var/count).
  ``axis_index_groups`` become a static membership mask over the slots, which
  works under ``shard_map`` too (``psum`` with groups does not), and without
  groups ``shard_map`` can infer that the statistics are replicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as flax_dtypes
from jax import lax
from jax.custom_batching import custom_vmap

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
    """The dtype statistics are computed in: at least float32 (complex stays complex)."""
    base = jnp.result_type(x_dtype) if dtype is None else jnp.dtype(dtype)
    return jnp.promote_types(base, jnp.float32)


def _real_dtype(dtype: Any) -> Any:
    return jnp.finfo(dtype).dtype


def abs_sq(x: Array) -> Array:
    """``|x|^2`` elementwise: real for complex ``x``."""
    if jnp.iscomplexobj(x):
        return lax.square(lax.real(x)) + lax.square(lax.imag(x))
    return lax.square(x)


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


# ----------------------------------------------------------------------------- the two paths

# Forced path for code traced while it is set (tests and benchmarks); None: by platform.
_forced_path: str | None = None
PATHS = ("checked", "shifted")


@contextlib.contextmanager
def statistics_path(path: str | None) -> Iterator[None]:
    """Forces the statistics path of everything traced inside: ``"checked"`` (XLA:CPU's
    checked fast sums), ``"shifted"`` (every other platform) or None (by platform).

    For tests and benchmarks, which run both paths on one machine. normzoo's own jitted
    pieces are compiled per path; a function of yours traced under one path and called again
    under the other keeps its first trace (trace it anew, or ``jax.clear_caches()``).
    """
    global _forced_path
    if path not in PATHS + (None,):
        raise ValueError(f"statistics_path: path={path!r} must be one of {PATHS} or None.")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def by_platform(*, checked: Callable[[], Any], shifted: Callable[[], Any]) -> Any:
    """The one place that picks a path: ``checked()`` on XLA:CPU, ``shifted()`` elsewhere.

    The choice is made when the computation is lowered, for the platform it is lowered
    for (``jax.lax.platform_dependent``), so compiled code contains one path only.
    """
    if _forced_path is not None:
        return {"checked": checked, "shifted": shifted}[_forced_path]()
    return lax.platform_dependent(cpu=checked, default=shifted)


@custom_vmap
def _all(flags: Array) -> Array:
    return jnp.all(flags)


@_all.def_vmap
def _all_vmap(axis_size, in_batched, flags):
    # One answer for the whole mapped batch: the lax.cond it feeds stays a branch under
    # jax.vmap (a batched predicate would turn it into a select that runs both sides).
    del axis_size, in_batched
    return jnp.all(flags), False


def _checked(fast: Array, cheap: Callable, careful: Callable, *operands):
    """``cheap(*operands)`` if every ``fast`` flag holds, else ``careful(*operands)``."""
    return lax.cond(_all(lax.stop_gradient(fast)), cheap, careful, *operands)


# ----------------------------------------------------------------------------- devices


class UnboundAxisError(ValueError, NameError):
    """``axis_name`` names no mapped axis here: a ``ValueError`` that explains the three ways
    to train on several devices, and a ``NameError`` as JAX (and so flax) raises."""


def _check_groups(axis_name: str, axis_index_groups: Any, *, layer: str) -> int:
    """Returns the size of ``axis_name``, raising clear errors for bad axes and groups."""
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        raise UnboundAxisError(
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


def _member_view(member: Array, like: Array) -> Array:
    return jnp.reshape(member, (-1,) + (1,) * (like.ndim - 1))


def group_mean(stacked: Array, member: Array | None) -> Array:
    """Mean over the leading (device) axis of ``stacked``, within this device's group."""
    if member is None:
        return jnp.mean(stacked, 0)
    w = _member_view(member, stacked).astype(stacked.dtype)
    return jnp.sum(stacked * w, 0) / jnp.sum(member)


# ----------------------------------------------------------------------------- moments


# Where the fast formulas are trusted: every |mean| <= _SPREAD standard deviations.
# There E|x|^2 - |E x|^2 and sum(dy*x) - mean*sum(dy) lose at most log2(1 + 4**2) ~ 4 bits
# to cancellation, about what float32 summation loses anyway.
_SPREAD = 4.0


def local_moments(
    x: Array, axes: tuple[int, ...], mask: Array | None, use_mean: bool
) -> tuple[Array, Array, Array]:
    """Per-device ``(count, mean, M2)`` over ``axes`` (reduced away).

    ``count`` and ``M2`` (the sum of squared deviations ``|x - mean|^2``) are real, ``mean``
    has x's dtype. With ``use_mean=False`` ``mean`` is zero and ``M2`` is the plain sum of
    squares (RMSNorm). ``axes`` may be empty: then each element is its own statistic
    (count 1, M2 0). The derivative is defined analytically (``dmean = dx/n``,
    ``dM2 = 2 Re(conj(x - mean) dx)``), so the backward pass never sees which path ran.
    """
    # The forced path (tests) is a static argument: compiled functions are kept per path.
    return _local_moments_jit(x, mask, axes, use_mean, _forced_path)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _local_moments(x, mask, axes, use_mean, path=None):
    real = _real_dtype(x.dtype)
    if mask is None:
        n = math.prod(x.shape[a] for a in axes)
        count = jnp.full(tuple(s for i, s in enumerate(x.shape) if i not in axes), n, real)

        def rsum(v):
            return jnp.sum(v, axes)

    else:
        count = jnp.sum(mask, axes, dtype=real)

        def rsum(v):
            return jnp.sum(jnp.where(mask, v, 0), axes)

    # An all-masked slice has no statistics; dividing by 1 keeps them finite (0).
    safe = jnp.maximum(count, 1)
    if not use_mean:
        return count, jnp.zeros(count.shape, x.dtype), rsum(abs_sq(x))
    if not axes:  # nothing to reduce (a per-example vmap): each element is its own mean
        return count, rsum(x), jnp.zeros(count.shape, real)

    def shifted(pilot):
        d = x - jnp.expand_dims(pilot, axes)
        s1, s2 = rsum(d), rsum(abs_sq(d))
        # s2 - |s1|^2/n is >= 0 in exact arithmetic; clip round-off so rsqrt never sees < 0.
        return pilot + s1 / safe, jnp.maximum(s2 - abs_sq(s1) / safe, 0.0)

    def checked():
        # The fast sums, checked. Where a mean is large against its spread, a second
        # pass around the (accurate) fast mean corrects both.
        s1, s2 = rsum(x), rsum(abs_sq(x))
        mean = s1 / safe
        m2 = jnp.maximum(s2 - abs_sq(s1) / safe, 0.0)
        return _checked(abs_sq(mean) * count <= _SPREAD**2 * m2, lambda: (mean, m2), lambda: shifted(mean))

    def one_pass():
        if mask is None and axes and axes[-1] != 0:
            # Around the mean of the first slice along the innermost reduced axis.
            return shifted(jnp.mean(lax.slice_in_dim(x, 0, 1, axis=axes[-1]), axes))
        return shifted(rsum(x) / safe)  # padding, or the sharded batch axis: the exact mean

    mean, m2 = by_platform(checked=checked, shifted=one_pass)
    return count, mean, m2


_local_moments_jit = jax.jit(_local_moments, static_argnums=(2, 3, 4))


@_local_moments.defjvp
def _local_moments_jvp(axes, use_mean, path, primals, tangents):
    x, mask = primals
    dx = tangents[0]
    count, mean, m2 = out = _local_moments(x, mask, axes, use_mean, path)
    centered = x - jnp.expand_dims(mean, axes) if use_mean else x
    w, wc = dx, lax.real(jnp.conj(centered) * dx) if jnp.iscomplexobj(x) else centered * dx
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
    spread = jnp.sum(count * abs_sq(mean - jnp.expand_dims(combined, axis)), axis)
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
    if axis_name is None:
        return count, mean, m2
    # Real parts only in the one all-reduce: (count, mean[, imag(mean)], M2).
    parts = [count, lax.real(mean), lax.imag(mean), m2] if jnp.iscomplexobj(mean) else [count, mean, m2]
    stacked, member = gather_all(jnp.stack(parts), axis_name, axis_index_groups, layer=layer)
    n_i, m2_i = stacked[:, 0], stacked[:, -1]
    mean_i = stacked[:, 1] if len(parts) == 3 else lax.complex(stacked[:, 1], stacked[:, 2])
    if member is not None:  # devices outside this group count for nothing
        n_i = jnp.where(_member_view(member, n_i), n_i, 0)
    return combine_moments(n_i, mean_i, jnp.where(n_i > 0, m2_i, 0))


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
      x: input array, any float or complex dtype.
      axes: axes to reduce over (removed from the outputs); may be empty.
      mask: optional boolean array broadcastable to ``x``; only True positions count.
      use_mean: if False the mean is zero and the "variance" is the mean square.
      dtype: minimal dtype of the statistics (promoted to at least float32).
      axis_name: mapped axis to reduce over as well (pmap / shard_map / vmap), with
        one ``psum``.
      axis_index_groups: optional partition of ``axis_name``'s indices; statistics
        are combined within each group only.
      layer: name used in error messages.

    Returns:
      ``(mean, var)``, each of x's shape with ``axes`` removed; ``var = E|x - mean|^2`` is
      real, ``mean`` has the stats dtype (complex for complex ``x``).

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import moments
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


# ----------------------------------------------------------------------------- the output map


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["mean", "mul", "add", "small_mean"], meta_fields=["dtype"],
)
@dataclasses.dataclass(frozen=True)
class AffineMap:
    """``y = ((x - mean) * mul + add).astype(dtype)``: a normalizer with its statistics folded in.

    ``mean``, ``mul`` and ``add`` broadcast against the input (``add`` may be None). Build one
    with :meth:`normalizing`; layers return it from their public ``affine_map`` method (at
    inference it is the per-channel scale ``mul`` and shift ``add - mean * mul`` that
    folding into a preceding layer needs), and layers built from others (IBN) :meth:`join`
    their parts' maps and apply them in one pass over ``x``.

    ``small_mean`` (a bool, or None for "unknown") says that every ``|mean|`` is within
    ``_SPREAD`` standard deviations of the data. On the checked path (:func:`by_platform`)
    the map is then applied as ``x * mul + (add - mean * mul)``, whose backward pass takes
    ``sum(dy * (x - mean))`` as ``sum(dy * x) - mean * sum(dy)``: plain reductions, no
    ``x - mean`` pass, and at most ~4 bits lost to cancellation. Otherwise, and on every
    other platform, it is applied as written (on the checked path recomputing ``x - mean``
    in the backward pass rather than storing it). Maps as large as ``x`` (LayerNorm's
    per-row statistics times per-feature scale) have no such sums and are always applied as
    written.

    A pytree (``dtype`` is static), so it can be returned from jitted and Flax functions.
    """

    mean: Array
    mul: Array
    add: Array | None
    dtype: Any
    small_mean: Array | None = None

    @classmethod
    def normalizing(cls, x: Array, mean: Array, inv: Array, *, scale: Array | None = None,
                    bias: Array | None = None, offset: Array | None = None,
                    dtype: Any = None) -> AffineMap:
        """The map ``y = ((x - mean) * inv + offset) * scale + bias`` (absent terms skipped).

        ``inv`` is ``1/sqrt(var + eps)`` (times BatchRenorm's ``r``), ``offset`` BatchRenorm's
        ``d``; every argument broadcasts against ``x``, which is not applied, only read for
        its dtype. The output dtype follows flax.linen: ``dtype`` if given, else the
        promotion of ``x`` and the parameters used.
        """
        dtype = flax_dtypes.canonicalize_dtype(x, *(p for p in (scale, bias) if p is not None), dtype=dtype)
        mul = inv if scale is None else inv * scale
        add = offset if offset is None or scale is None else offset * scale
        if bias is not None:
            add = bias if add is None else add + bias
        small = jnp.all(lax.stop_gradient(jnp.abs(mean * inv)) <= _SPREAD)
        return cls(mean, mul, add, dtype, small)

    def __call__(self, x: Array) -> Array:
        return _apply_map(x, self, _forced_path)

    def then(self, mul: Array, add: Array) -> AffineMap:
        """This map followed by ``y * mul + add`` (both broadcast against ``x``)."""
        shift = add if self.add is None else self.add * mul + add
        return AffineMap(self.mean, self.mul * mul, shift, self.dtype, None)


    def join(self, other: AffineMap, axis: int, rank: int, split: int, size: int) -> AffineMap:
        """This map on channels ``[:split]`` of ``axis`` and ``other`` on ``[split:size]``.

        Each part is zero-padded to all channels and the two are added (exact): unlike a
        concatenation this broadcasts a per-example part against a per-channel one, and
        keeps a batch-sharded part's sharding under explicit sharding.
        """
        def pad(a, lo, hi):
            if a is None:
                return None
            widths = [(0, 0)] * rank
            widths[axis] = (lo, hi)
            return jnp.pad(jnp.reshape(a, (1,) * (rank - jnp.ndim(a)) + jnp.shape(a)), widths)

        def both(a, b):
            a, b = pad(a, 0, size - split), pad(b, split, 0)
            return b if a is None else a if b is None else a + b

        small = None
        if self.small_mean is not None and other.small_mean is not None:
            small = jnp.logical_and(self.small_mean, other.small_mean)
        return AffineMap(both(self.mean, other.mean), both(self.mul, other.mul),
                         both(self.add, other.add), jnp.promote_types(self.dtype, other.dtype), small)


def _centered(x, mean, mul, add):
    y = (x - mean) * mul
    return y if add is None else y + add


def _shortcut(x, mean, mul, add):
    offset = -mean * mul
    return x * mul + (offset if add is None else add + offset)


# Jitted (and so compiled once per shape when called eagerly, e.g. by `init`): eager
# branches on data would otherwise compile anew at every call. Under a trace they inline.
@functools.partial(jax.jit, static_argnums=2)
def _apply_map(x: Array, amap: AffineMap, path: str | None = None) -> Array:
    x = jnp.asarray(x, jnp.promote_types(stats_dtype(x.dtype), jnp.result_type(amap.mean)))
    args: tuple[Array | None, ...] = (x, amap.mean, amap.mul, amap.add)
    parts = [jnp.shape(a) for a in args[1:] if a is not None]
    small_mean = amap.small_mean
    if small_mean is None or math.prod(jnp.broadcast_shapes(*parts)) >= x.size:
        y = _centered(*args)
    else:
        # Under shard_map the per-channel terms are replicated and x is not: cast them to x's
        # varying axes here, outside the branch, so that the backward pass sums their
        # cotangents across devices once, after the branch, instead of once in each branch.
        args = (x,) + tuple(None if a is None else _varying_like(a, x) for a in args[1:])
        y = by_platform(
            checked=lambda: _checked(small_mean, _shortcut, jax.checkpoint(_centered), *args),
            shifted=lambda: _centered(*args),
        )
    return jnp.asarray(y, amap.dtype)


def _varying_axes(a: Any) -> frozenset:
    """The mesh axes ``a`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _varying_like(a: Array, x: Array) -> Array:
    """``a`` marked as varying over every mesh axis ``x`` varies over (a no-op outside shard_map)."""
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(a)))
    if not missing:
        return a
    if hasattr(lax, "pcast"):
        return lax.pcast(a, missing, to="varying")
    return getattr(lax, "pvary")(a, missing)  # jax < 0.8


__all__ = [
    "AffineMap",
    "PATHS",
    "UnboundAxisError",
    "abs_sq",
    "by_platform",
    "canonicalize_axes",
    "check_mask",
    "combine_moments",
    "gather_all",
    "group_mean",
    "local_moments",
    "moments",
    "statistics_path",
    "stats_dtype",
    "synced_moments",
    "sync_batch_stats",
]
