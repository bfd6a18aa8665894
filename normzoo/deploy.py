r"""From training to deployment, for any Flax (linen) model.

* :func:`fold`: at inference a batch-statistics normalizer is one scale and one shift per
  channel. Where its input is the direct output of a ``Dense`` / ``Conv`` / ``ConvTranspose``
  (flax's, or normzoo's WeightNorm layers), fold it into that layer's kernel and bias:

  .. math:: W' = W \cdot m,\qquad b' = (b - \mu)\, m + a

  with ``m``, ``a``, :math:`\mu` the normalizer's inference map :math:`y = (x - \mu) m + a`
  (:math:`m = \gamma / \sqrt{\sigma^2 + \epsilon}`, :math:`a = \beta`). WeightNorm's ``g v / ||v||`` is
  materialized into a plain kernel. Every other batch-statistics normalizer becomes its
  per-channel map; per-example normalizers (LayerNorm, GroupNorm, InstanceNorm, RMSNorm,
  IBN's instance part, CosineNorm), EvoNorm-B0 and IterNorm (whose inference map mixes the
  channels of a group) stay as they are. The pairs are found from the model itself:
  one trace with every module call intercepted.
* :func:`precise_batch_stats` (precise BN) and :func:`adabn`: recompute the running statistics
  with the trained parameters as the exact average of per-batch statistics over N batches,
  on the training data or (AdaBN) on unlabeled data of a new domain.
* :func:`port_torch`: a PyTorch ``state_dict`` into a Flax model in one call, the mapping
  derived from the two models (kinds, order, shapes) and checked against PyTorch's outputs (and,
  with :func:`torch_activations`, its per-module outputs, naming the first module off);
  :func:`from_torch` / :func:`to_torch`: state dicts in and out with an explicit mapping (plain
  NumPy arrays; torch is not needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir

from normzoo import _stats, _weight
from normzoo import functional as F
from normzoo._batch import EvoNormB0, FrozenBatchNorm, _Mapped
from normzoo._composite import IBN
from normzoo._sample import (EvoNormS0, FilterResponseNorm, GlobalResponseNorm, GroupNorm, InstanceNorm, LayerNorm,
                             RMSNorm)
from normzoo._stats import AffineMap
from normzoo._whiten import IterNorm
from normzoo._torch import Port, from_torch, port_torch, to_torch, torch_activations

__all__ = ["Folded", "Port", "adabn", "batch_statistics", "fold", "fold_pair", "from_torch", "port_torch",
           "precise_batch_stats", "to_torch", "torch_activations"]

Array = jax.Array

# ----------------------------------------------------------------------------- folding

# An identity that names a value in a traced program: fold() marks every producer's output and
# every normalizer's input, then reads off the jaxpr which normalizer consumes which output, and
# whether anything else consumes it too (then folding would change that other use).
_mark_p = jcore.Primitive("normzoo_deploy_mark")
_mark_p.def_impl(lambda x, *, tag: x)
_mark_p.def_abstract_eval(lambda x, *, tag: x)
mlir.register_lowering(_mark_p, lambda ctx, x, *, tag: [x])
batching.primitive_batchers[_mark_p] = lambda args, dims, *, tag: (_mark_p.bind(args[0], tag=tag), dims[0])
ad.primitive_jvps[_mark_p] = lambda primals, tangents, *, tag: (_mark_p.bind(primals[0], tag=tag), tangents[0])

_MAX_ERROR = 1e-3  # fold() refuses a result further than this from the model (float32 rounding: ~1e-6)
_PRODUCERS = (nn.Dense, nn.Conv, nn.ConvTranspose, _weight.WeightNormDense, _weight.WeightNormConv)
_WEIGHT_NORM = (_weight.WeightNormDense, _weight.WeightNormConv)
_PER_EXAMPLE = (LayerNorm, GroupNorm, InstanceNorm, RMSNorm, _weight.CosineDense, _weight.CosineConv,
                nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm, FilterResponseNorm, GlobalResponseNorm,
                EvoNormS0)
_NONLINEAR = (EvoNormB0,)  # batch statistics, but normalization and activation in one: not an affine map
_WHITENING = (IterNorm,)  # an affine map, but a matrix across the channels of each group: not per channel


@dataclasses.dataclass(frozen=True)
class Folded:
    """An inference model with its normalizers folded: the result of :func:`fold`.

    Attributes:
      model: the original module (unchanged).
      variables: the inference variables; a folded producer holds a plain ``kernel`` and
        ``bias``, a folded normalizer nothing, an unfolded batch-statistics normalizer its map
        ``mean``, ``mul``, ``add`` (``y = (x - mean) * mul + add``).
      report: one row per normalizer (and WeightNorm layer) found: ``(path, layer, status,
        detail)``, status ``"folded"`` (detail: the producer's path), ``"materialized"``,
        ``"affine"`` (detail: why it could not be folded) or ``"kept"`` (per-example statistics).
      max_error: ``max |folded - original| / max |original|`` over the outputs on the sample
        input fold() was given (both in inference mode).
    """

    model: nn.Module
    variables: dict
    report: tuple[tuple[str, str, str, str], ...]
    max_error: float
    _actions: dict = dataclasses.field(repr=False)
    _method: Any = dataclasses.field(repr=False)

    @property
    def folded(self) -> dict[str, str]:
        """``{normalizer path: producer path}`` of every folded pair."""
        return {p: d for p, _, s, d in self.report if s == "folded"}

    @property
    def unfolded(self) -> dict[str, str]:
        """``{normalizer path: reason}`` of every normalizer left in place (affine or kept)."""
        return {p: d for p, _, s, d in self.report if s in ("affine", "kept")}

    def apply(self, variables: Mapping, *args, **kwargs):
        """``model.apply`` with the folded layers: same arguments (the inference ones)."""
        with nn.intercept_methods(self._intercept):
            return self.model.apply(variables, *args, method=self._method, **kwargs)

    def __call__(self, *args, **kwargs):
        """``apply(self.variables, *args, **kwargs)``."""
        return self.apply(self.variables, *args, **kwargs)

    def _intercept(self, next_fun, args, kwargs, context):
        action = self._actions.get(context.module.path)
        if action is None or context.method_name != action[0]:
            return next_fun(*args, **kwargs)
        kind, params = action[1], context.module.variables.get("params", {})
        if kind == "plain":  # a Dense / Conv with the folded or materialized kernel
            return action[2].apply({"params": params}, args[0])
        if kind == "identity":
            return jnp.asarray(args[0], action[2])
        amap = AffineMap(params["mean"], params["mul"], params.get("add"), action[2])
        return amap(args[0]) if kind == "affine" else amap  # "map": IBN's part, joined by IBN


@dataclasses.dataclass
class _Call:
    path: tuple[str, ...]
    module: nn.Module
    role: str  # "producer", "batch" (flax or normzoo, one map), "ibn", "kept", "nonlinear", "whitening"
    map: tuple | None = None  # (mean, mul, add) of a batch normalizer, IBN's batch part's
    dtype: Any = None  # the dtype the normalizer (or IBN's batch part) returned
    rank: int = 0  # the normalizer's input rank


def _inference_flag(mdl, args, kwargs, path):
    """The resolved ``use_running_average`` of a batch normalizer's call; an error if False."""
    given = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    if not nn.merge_param("use_running_average", mdl.use_running_average, given):
        raise ValueError(
            f"fold: the {type(mdl).__name__} at '{'/'.join(path)}' ran in training mode "
            "(use_running_average=False): pass fold the model's inference-mode arguments "
            "(e.g. train=False), as for model.apply at inference."
        )
    return given


def _flax_batch_norm_map(mdl: nn.BatchNorm, x: Array):
    axes = _stats.canonicalize_axes(x.ndim, mdl.axis, argument="axis", layer="BatchNorm")
    view = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    stats, params = mdl.variables["batch_stats"], mdl.variables.get("params", {})
    mean = jnp.reshape(stats["mean"], view)
    mul = lax.rsqrt(jnp.reshape(stats["var"], view) + mdl.epsilon)
    if mdl.use_scale:
        mul = mul * jnp.reshape(params["scale"], view)
    add = jnp.reshape(params["bias"], view) if mdl.use_bias else None
    return mean, mul, add


def _discover(model, method, kwargs):
    """``(calls, fn)``: ``fn(variables, *args)`` runs the model in inference mode, recording each
    relevant module call in ``calls`` and returning ``(outputs, [map of each batch call])``; each
    producer's output and each normalizer's input carry a mark (an identity) in its program."""
    calls: list[_Call] = []

    def intercept(next_fun, args, kw, context):
        m, name = context.module, context.method_name
        path = m.path
        if name == "__call__" and isinstance(m, _PRODUCERS):
            y = next_fun(*args, **kw)
            calls.append(_Call(path, m, "producer"))
            return _mark_p.bind(y, tag=("out", len(calls) - 1))
        if name == "affine_map" and isinstance(m, _Mapped) and isinstance(m.parent, IBN):
            amap = next_fun(*args, **kw)  # IBN's batch part: the owner is the last IBN call
            owner = next(c for c in reversed(calls) if c.role == "ibn" and c.path == m.parent.path)
            owner.map, owner.dtype = (amap.mean, amap.mul, amap.add), amap.dtype
            return amap
        if name == "__call__" and isinstance(m, (_Mapped, nn.BatchNorm)):
            # A frozen BatchNorm normalizes by its stored statistics whatever the mode.
            given = None if isinstance(m, FrozenBatchNorm) else _inference_flag(m, args, kw, path)
            calls.append(_Call(path, m, "ibn" if isinstance(m, IBN) else "batch"))
            call, x = calls[-1], args[0]
            call.rank = jnp.ndim(x)
            x = _mark_p.bind(x, tag=("in", len(calls) - 1))
            if isinstance(m, IBN):
                return next_fun(x, *args[1:], **kw)
            if isinstance(m, nn.BatchNorm):
                y = next_fun(x, *args[1:], **kw)
                call.map, call.dtype = _flax_batch_norm_map(m, x), y.dtype
                return y
            amap = m.affine_map(x, given, mask=kw.get("mask"))  # what __call__ applies
            call.map, call.dtype = (amap.mean, amap.mul, amap.add), amap.dtype
            return amap(x)
        if name == "__call__" and isinstance(m, _PER_EXAMPLE):
            calls.append(_Call(path, m, "kept"))
        if name == "__call__" and isinstance(m, _NONLINEAR):
            calls.append(_Call(path, m, "nonlinear"))
        if name == "__call__" and isinstance(m, _WHITENING):
            _inference_flag(m, args, kw, path)
            calls.append(_Call(path, m, "whitening"))
        return next_fun(*args, **kw)

    def fn(variables, *args):
        calls.clear()
        with nn.intercept_methods(intercept):
            out = model.apply(variables, *args, method=method, **kwargs)
        return out, [c.map for c in calls]

    return calls, fn


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jcore.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jcore.Jaxpr):
                yield v


def _consumers(closed) -> dict[int, tuple[int | None, str]]:
    """For each normalizer-input mark: ``(producer call index or None, reason if None)``."""
    outs, ins = {}, {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is _mark_p:
                kind, index = eqn.params["tag"]
                if kind == "out":
                    outs[eqn.outvars[0]] = (index, jaxpr)
                else:
                    ins[index] = (eqn.invars[0], jaxpr)
            for sub in _sub_jaxprs(eqn.params):
                walk(sub)

    walk(closed.jaxpr)
    found: dict[int, tuple[int | None, str]] = {}
    for index, (var, jaxpr) in ins.items():
        producer = outs.get(var) if isinstance(var, jcore.Var) else None
        if producer is None or producer[1] is not jaxpr:
            found[index] = (None, "its input is not the direct output of a Dense/Conv/ConvTranspose")
            continue
        uses = sum(v is var for e in jaxpr.eqns for v in e.invars) + sum(v is var for v in jaxpr.outvars)
        if uses != 1:
            found[index] = (None, f"the output of its producer is also used elsewhere ({uses} uses)")
        else:
            found[index] = (producer[0], "")
    return found


def _per_channel(a, rank: int, channels: int, fill: float):
    """A map's per-channel vector of the last axis (``fill`` where the term is absent), or None
    if it varies along another axis."""
    if a is None:
        return jnp.full((channels,), fill, jnp.float32)
    a = jnp.reshape(a, (1,) * (rank - jnp.ndim(a)) + jnp.shape(a))
    if any(d != 1 for d in a.shape[:-1]) or a.shape[-1] not in (1, channels):
        return None
    return jnp.broadcast_to(jnp.reshape(a, (-1,)), (channels,))


def _plain(m: nn.Module) -> nn.Module:
    """The flax Dense / Conv / ConvTranspose that computes ``m`` with a plain kernel and a bias."""
    if isinstance(m, _WEIGHT_NORM):
        cls = nn.Dense if isinstance(m, _weight.WeightNormDense) else nn.Conv
        fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
        return cls(**{**fields, "use_bias": True, **({"mask": None} if "mask" in fields else {})})  # mask is in the kernel
    return m.clone(parent=None, name=None, use_bias=True)


def _kernel_and_bias(m: nn.Module, params: Mapping):
    if isinstance(m, _WEIGHT_NORM):
        kernel = F.weight_norm(params["v"], params["g"], epsilon=m.epsilon, mask=getattr(m, "mask", None), dtype=m.dtype)
    else:
        kernel = params["kernel"]
    return kernel, params.get("bias")


def _out_axis(m: nn.Module) -> int:
    return -2 if isinstance(m, nn.ConvTranspose) and m.transpose_kernel else -1


def fold(model: nn.Module, variables: Mapping, *args, method: Callable | str | None = None, **kwargs) -> Folded:
    r"""Folds every foldable normalizer of ``model`` into the layer before it.

    Traces ``model.apply(variables, *args, method=method, **kwargs)`` once (give the inference
    arguments, e.g. ``train=False``: a normalizer in training mode is an error) with every
    module call intercepted, and finds each batch-statistics normalizer (flax's and normzoo's
    BatchNorm, BatchRenorm, MeanOnlyBatchNorm, ``normzoo.sbx.BatchRenorm``, IBN's BatchNorm
    part) whose input is the output of a flax ``Dense`` / ``Conv`` / ``ConvTranspose`` or a
    normzoo ``WeightNormDense`` / ``WeightNormConv`` used by nothing else. Those are folded:

    .. math:: W' = W \cdot m,\qquad b' = (b - \mu)\, m + a

    over the producer's output channels, with the normalizer's inference map
    :math:`y = (x - \mu) m + a`. WeightNorm kernels ``g v / ||v||`` are materialized. Normalizers
    that cannot be folded (after an activation, an add, a reshape; producer output used twice;
    statistics along another axis than the producer's channels; modules called more than once)
    become their map (three vectors, applied as ``(x - mean) * mul + add``). Per-example
    normalizers, normalization-activation layers (EvoNorm-B0) and whitening layers (IterNorm,
    whose map multiplies by a matrix across channels) stay and are reported as kept.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import normzoo
      >>> from normzoo import deploy
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train):
      ...     x = normzoo.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
      ...     return normzoo.BatchNorm(use_running_average=not train)(nn.relu(x))
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> variables = Net().init(jax.random.key(1), x, train=False)
      >>> folded = deploy.fold(Net(), variables, x, train=False)
      >>> folded.folded, list(folded.unfolded)
      ({'BatchNorm_0': 'Conv_0'}, ['BatchNorm_1'])
      >>> sorted(folded.variables['params']['Conv_0']), folded.max_error < 1e-6
      (['bias', 'kernel'], True)
      >>> bool(jnp.allclose(folded(x, train=False), Net().apply(variables, x, train=False), atol=1e-5))
      True

    Args:
      model: any flax.linen Module.
      variables: its variables (``params``, ``batch_stats``, ...).
      *args: a sample input (shapes matter; the values give ``max_error``).
      method: as in ``model.apply``.
      **kwargs: the inference-mode keyword arguments of the call.

    Returns:
      A :class:`Folded`: ``.variables``, ``.apply(variables, *args, **kwargs)`` (or call it),
      ``.report``, ``.folded``, ``.unfolded``, ``.max_error``.
    """
    calls, plan, reference = _plan(model, variables, args, method, kwargs)
    new_variables, actions, report = _rewrite(calls, plan, variables)
    return _verify(Folded(model, new_variables, tuple(report), 0.0, actions, method), args, kwargs, reference)


def fold_pair(kernel: Array, bias: Array | None, mean: Array, mul: Array, add: Array, *, axis: int = -1):
    r"""One producer and the per-channel inference map ``y = (x - mean) * mul + add`` after it,
    as one producer: :math:`W' = W \cdot m` along the kernel's output axis ``axis``, :math:`b' = (b - \mu)
    m + a` (a missing ``bias`` is zero).

    Computed in at least float32; returned in the kernel's (and bias') dtype. ``mean``, ``mul`` and
    ``add`` are vectors over the output channels.

    Example:
      >>> import jax.numpy as jnp
      >>> from normzoo import deploy
      >>> k, b = deploy.fold_pair(jnp.ones((2, 3)), jnp.zeros(3), jnp.full(3, 1.0), jnp.array([1.0, 2.0, 3.0]),
      ...                         jnp.full(3, 0.5))
      >>> k.tolist(), b.tolist()
      ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [-0.5, -1.5, -2.5])
    """
    f32 = jnp.promote_types(jnp.result_type(kernel), jnp.float32)
    k32 = jnp.asarray(kernel, f32)
    axis = axis % k32.ndim
    view = [1] * k32.ndim
    view[axis] = -1
    b32 = jnp.zeros((k32.shape[axis],), f32) if bias is None else jnp.asarray(bias, f32)
    new_bias = (b32 - jnp.asarray(mean, f32)) * jnp.asarray(mul, f32) + jnp.asarray(add, f32)
    new_kernel = k32 * jnp.reshape(jnp.asarray(mul, f32), view)
    return (jnp.asarray(new_kernel, jnp.result_type(kernel)),
            jnp.asarray(new_bias, jnp.result_type(kernel) if bias is None else jnp.result_type(bias)))


@dataclasses.dataclass(frozen=True)
class _Decision:
    """What becomes of one normalizer: ``"folded"`` into ``producer`` (with its per-channel
    vectors), ``"affine"`` (its map, for ``reason``) or ``"kept"``."""

    call: int
    status: str
    reason: str = ""
    producer: int | None = None
    vectors: tuple | None = None  # (mean, mul, add) over the normalizer's channels


def _plan(model, variables, args, method, kwargs):
    """Traces the model once: ``(calls, decisions, reference outputs)``."""
    # The marked program gives the structure, its run the maps' values (a plain jitted call: the
    # one that reports tracers leaking out of a lifted transform).
    calls, traced = _discover(model, method, kwargs)
    try:
        consumers = _consumers(jax.make_jaxpr(traced)(variables, *args))
        reference, maps = jax.jit(traced)(variables, *args)
    except jax.errors.UnexpectedTracerError as e:
        raise ValueError(
            "fold: a normalizer or producer runs inside a lifted transform (nn.remat, nn.jit, nn.scan, "
            "nn.vmap ...), whose traced values fold cannot read out; build the inference model without "
            "the transform (the variables are the same) and fold that."
        ) from e
    for call, value in zip(calls, maps):
        call.map = value
    counts: dict[tuple, int] = {}
    for c in calls:
        counts[c.path] = counts.get(c.path, 0) + 1
    decisions, claimed = [], set()
    for index, c in enumerate(calls):
        if c.role == "producer":
            continue
        if c.role == "kept":
            decisions.append(_Decision(index, "kept", "per-example statistics: nothing to fold"))
            continue
        if c.role == "nonlinear":
            decisions.append(_Decision(index, "kept", "a normalization-activation layer (not an affine map): "
                                                      "nothing to fold"))
            continue
        if c.role == "whitening":
            decisions.append(_Decision(index, "kept", "whitening: its inference map multiplies by a matrix across "
                                                      "the channels of each group, not a per-channel scale and shift"))
            continue
        if c.map is None:  # IBN with ratio 1: no batch part
            decisions.append(_Decision(index, "kept", "no batch-statistics part (ratio=1)"))
            continue
        if counts[c.path] > 1:  # one map per call (e.g. inputs of different ranks): leave it as it is
            decisions.append(_Decision(index, "kept", "called more than once (shared weights): one map per call"))
            continue
        producer, reason = consumers.get(index, (None, "not traced at the top level"))
        vectors = None
        if producer is not None:
            p = calls[producer]
            channels = p.module.features if c.role != "ibn" else jnp.shape(c.map[1])[-1]
            vectors = tuple(_per_channel(a, c.rank, channels, f) for a, f in zip(c.map, (0.0, 1.0, 0.0)))
            if counts[p.path] > 1:
                producer, reason = None, "its producer is called more than once (shared weights)"
            elif c.role == "ibn" and c.module.axis % c.rank != c.rank - 1:
                producer, reason = None, "IBN's channel axis is not the producer's output channels"
            elif any(v is None for v in vectors):
                producer, reason = None, "statistics along other axes than the producer's output channels"
            elif p.path in claimed:
                producer, reason = None, "its producer is already folded"
        if producer is None:
            decisions.append(_Decision(index, "affine", reason))
        else:
            claimed.add(calls[producer].path)
            decisions.append(_Decision(index, "folded", producer=producer, vectors=vectors))
    return calls, decisions, reference


def _rewrite(calls, decisions, variables):
    """The inference variables and the intercepts that use them: ``(variables, actions, report)``."""
    flat = traverse_util.flatten_dict(nn.unbox(dict(variables)))

    def drop(path):
        for key in [k for k in flat if k[1 : 1 + len(path)] == path]:
            del flat[key]

    def put(path, **arrays):
        for k, a in arrays.items():
            if a is not None:
                flat[("params",) + path + (k,)] = a

    def params_at(path):
        return {k[-1]: v for k, v in flat.items() if k[:-1] == ("params",) + path}

    actions, report, used = {}, [], set()

    def make_plain(c, kernel, bias):  # the producer becomes a plain Dense / Conv
        drop(c.path)
        put(c.path, kernel=kernel, bias=bias)
        actions[c.path] = ("__call__", "plain", _plain(c.module))
        used.add(c.path)

    for d in decisions:
        c = calls[d.call]
        label, kind = "/".join(c.path), type(c.module).__name__
        norm_path = c.path + ("BN",) if c.role == "ibn" else c.path
        if d.status == "kept":
            report.append((label, kind, "kept", d.reason))
            continue
        if d.status == "affine":
            mean, mul, add = c.map
            drop(norm_path)
            put(norm_path, mean=mean, mul=mul, add=add)
            actions[norm_path] = ("affine_map", "map", c.dtype) if c.role == "ibn" else ("__call__", "affine", c.dtype)
            report.append((label, kind, "affine", d.reason))
            continue
        p = calls[d.producer]
        kernel, bias = _kernel_and_bias(p.module, params_at(p.path))
        out = _out_axis(p.module)
        mu, m_vec, a_vec = d.vectors
        split = jnp.shape(kernel)[out] - m_vec.shape[0]  # IBN: its batch part is the last channels
        pad = lambda v, fill: jnp.concatenate([jnp.full((split,), fill, jnp.result_type(v)), v])  # noqa: E731
        make_plain(p, *fold_pair(kernel, bias, pad(mu, 0.0), pad(m_vec, 1.0), pad(a_vec, 0.0), axis=out))
        drop(norm_path)
        if c.role == "ibn":
            shape = (1,) * (c.rank - 1) + (m_vec.shape[0],)
            put(norm_path, mean=jnp.zeros(shape, jnp.float32), mul=jnp.ones(shape, jnp.float32))
            actions[norm_path] = ("affine_map", "map", c.dtype)
        else:
            actions[c.path] = ("__call__", "identity", c.dtype)
        report.append((label, kind, "folded", "/".join(p.path)))
    counts: dict[tuple, int] = {}
    for c in calls:
        counts[c.path] = counts.get(c.path, 0) + 1
    for c in calls:  # WeightNorm layers not folded into: materialized
        if c.role == "producer" and isinstance(c.module, _WEIGHT_NORM) and c.path not in used:
            if counts[c.path] > 1:
                report.append(("/".join(c.path), type(c.module).__name__, "kept", "called more than once"))
                continue
            params = params_at(c.path)
            kernel, bias = _kernel_and_bias(c.module, params)
            dtype = jnp.result_type(params["v"])
            make_plain(c, jnp.asarray(kernel, dtype), jnp.zeros((c.module.features,), dtype) if bias is None else bias)
            report.append(("/".join(c.path), type(c.module).__name__, "materialized", "g * v / ||v||"))
    return traverse_util.unflatten_dict(flat), actions, report


def _verify(result: Folded, args, kwargs, reference) -> Folded:
    """``result`` with its ``max_error`` against the model's outputs; an error beyond ``_MAX_ERROR``."""
    got = jax.jit(lambda v, *a: result.apply(v, *a, **kwargs))(result.variables, *args)
    if jax.tree.map(jnp.shape, got) != jax.tree.map(jnp.shape, reference):
        error = float("inf")
    else:
        error = max((float(jnp.max(jnp.abs(jnp.asarray(g, jnp.float32) - jnp.asarray(r, jnp.float32))))
                     / max(float(jnp.max(jnp.abs(jnp.asarray(r, jnp.float32)))), 1e-30)
                     for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(reference))), default=0.0)
    if not error <= _MAX_ERROR:
        raise ValueError(
            f"fold: the folded model's outputs differ from the model's on the sample input (max relative "
            f"error {error:.3g}, or other shapes): something reads a folded layer other than through "
            "its output (tied weights, a producer's kernel used elsewhere?). Folded pairs: "
            f"{result.folded}."
        )
    return dataclasses.replace(result, max_error=error)


# ----------------------------------------------------------------------------- statistics

_AVERAGED = ("mean", "var", "whitening")  # the running statistics re-estimated; other batch_stats stay


def _momentum_field(mdl: nn.Module) -> bool:
    fields = getattr(type(mdl), "__dataclass_fields__", {})
    return "momentum" in fields and "use_running_average" in fields and "batch_stats" in mdl.variables


def batch_statistics(model: nn.Module, variables: Mapping, *args, method: Callable | str | None = None,
                     **kwargs) -> dict:
    """One batch's statistics, exactly as every running-statistics layer computes them in training.

    Runs ``model.apply(variables, *args, mutable=['batch_stats'], **kwargs)`` (give the
    training-mode arguments, e.g. ``train=True``) with every layer that has a ``momentum`` and
    keeps ``batch_stats`` (flax's and normzoo's BatchNorm family, IBN, InstanceNorm with running
    statistics, or your own flax-style layer) run, through a method interceptor, as a copy of
    itself with ``momentum=0`` bound to the layer's own scope (its variables and rng streams;
    nothing is mutated), so that each layer's
    updated running statistics are this batch's statistics: its own reduction, masks, ghost
    batches and cross-device sync (``axis_name``, or a sharded batch under ``jit``) included.
    Each layer still normalizes as in training (BatchRenorm with its running statistics).
    Traceable: use it inside ``jit``, ``shard_map`` or ``pmap``.

    Returns:
      A ``batch_stats`` tree shaped like ``variables['batch_stats']``.
    """
    twins: dict[int, nn.Module] = {}

    def capture(next_fun, a, kw, context):
        # Each running-statistics layer runs as a copy of itself with momentum 0 bound to the
        # layer's own scope: its variables (so its updated running statistics are this batch's
        # statistics, written where the layer's go, lifted transforms included) and its rng
        # streams (the same draws as the layer's). Nothing is mutated.
        m = context.module
        if context.method_name not in ("__call__", "affine_map") or not _momentum_field(m) or m.momentum == 0.0:
            return next_fun(*a, **kw)
        given = a[1] if len(a) > 1 else kw.get("use_running_average")
        if (given if given is not None else m.use_running_average):  # inference: no statistics taken
            return next_fun(*a, **kw)
        twin = twins.get(id(m))
        if twin is None:  # one twin per module (and so per scope): a shared module is called again
            twin = twins[id(m)] = m.clone(parent=m.scope, momentum=0.0)
        return getattr(twin, context.method_name)(*a, **kw)

    with nn.intercept_methods(capture):
        _, updates = model.apply(variables, *args, method=method, mutable=["batch_stats"], **kwargs)
    if not twins:
        raise ValueError(
            "batch_statistics: no layer computed batch statistics (each ran with "
            "use_running_average=True, or none keeps batch_stats): pass the model's "
            "training-mode arguments, e.g. train=True."
        )
    return updates["batch_stats"]


def precise_batch_stats(model: nn.Module, variables: Mapping, batches: Iterable, *,
                        statistics: Callable | None = None, method: Callable | str | None = None,
                        **kwargs) -> dict:
    r"""Precise BN: running statistics re-estimated as the exact average over ``batches``.

    For every running mean and variance (``batch_stats`` leaves named ``mean`` and ``var``),

    .. math:: \hat\mu = \frac1N \sum_{n=1}^{N} \mu_{B_n},\qquad \hat\sigma^2 = \frac1N \sum_{n=1}^{N} \sigma^2_{B_n}

    with :math:`\mu_{B_n}, \sigma^2_{B_n}` what the layer computes on batch ``n`` in training (see
    :func:`batch_statistics`): the average of per-batch statistics, as fvcore's precise BN and
    ``torch.optim.swa_utils.update_bn``, not an EMA; accumulated in float64. The parameters and
    the other ``batch_stats`` leaves (BatchRenorm's step counter, sbx's bounds) are unchanged.
    The statistics of batch ``n`` depend on the layers before, which normalize with batch
    statistics as in training.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import normzoo
      >>> from normzoo import deploy
      >>> bn = normzoo.BatchNorm()
      >>> batches = [jax.random.normal(jax.random.key(i), (64, 3)) * 2 + 5 for i in range(4)]
      >>> variables = bn.init(jax.random.key(0), batches[0], use_running_average=True)
      >>> new = deploy.precise_batch_stats(bn, variables, batches, use_running_average=False)
      >>> mean = jnp.mean(jnp.stack([b.mean(0) for b in batches]), 0)
      >>> bool(jnp.allclose(new['batch_stats']['mean'], mean, atol=1e-6))
      True

    Args:
      model, variables: the trained model and its variables.
      batches: an iterable of inputs; each item is one positional argument, or a tuple of them.
      statistics: ``fn(variables, *batch) -> batch_stats``; default
        ``jax.jit(batch_statistics(model, variables, *batch, method=method, **kwargs))``. Pass
        your own to run it under ``shard_map`` or ``pmap`` (return the statistics replicated:
        e.g. ``out_specs=P()``, or index replica 0 after ``pmap``).
      method, kwargs: as ``model.apply``, training mode (e.g. ``train=True``, ``rngs=``).

    Returns:
      ``variables`` with the re-estimated ``batch_stats``.
    """
    if statistics is None:
        statistics = jax.jit(lambda v, *b: batch_statistics(model, v, *b, method=method, **kwargs))
    flat_old = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    sums, count = None, 0
    for batch in batches:
        batch = batch if isinstance(batch, tuple) else (batch,)
        flat = traverse_util.flatten_dict(dict(jax.device_get(statistics(variables, *batch))))
        if set(flat) != set(flat_old):
            raise ValueError(
                "precise_batch_stats: the statistics of a batch have other leaves than "
                f"variables['batch_stats'] (got {sorted(flat)}, expected {sorted(flat_old)})."
            )
        wide = {k: np.asarray(v, np.result_type(v.dtype, np.float64)) for k, v in flat.items() if k[-1] in _AVERAGED}
        sums = wide if sums is None else {k: sums[k] + wide[k] for k in sums}
        count += 1
    if sums is None:
        raise ValueError("precise_batch_stats: `batches` yielded no batch; give at least one.")
    new = {k: (jnp.asarray(sums[k] / count, jnp.asarray(v).dtype) if k in sums else v) for k, v in flat_old.items()}
    return {**variables, "batch_stats": traverse_util.unflatten_dict(new)}


def adabn(model: nn.Module, variables: Mapping, target_batches: Iterable, **kwargs) -> dict:
    """AdaBN (Li et al. 2016, arXiv:1603.04779): the running statistics re-estimated on unlabeled
    data of the target domain, parameters unchanged; :func:`precise_batch_stats` on
    ``target_batches`` (same keyword arguments)."""
    return precise_batch_stats(model, variables, target_batches, **kwargs)
