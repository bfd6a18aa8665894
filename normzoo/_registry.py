"""One string picks the normalizer of a whole model: ``normzoo.make(name, **overrides)``."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normzoo._batch import (BatchNorm, BatchRenorm, EvoNormB0, FrozenBatchNorm, LpBatchNorm, MeanOnlyBatchNorm,
                            NoisyBatchNorm)
from normzoo._composite import IBN
from normzoo._sample import (EvoNormS0, FilterResponseNorm, GlobalResponseNorm, GroupNorm, InstanceNorm, LayerNorm,
                             RMSNorm)
from normzoo._weight import CosineConv, CosineDense, StdConv, StdDense, WeightNormConv, WeightNormDense
from normzoo._whiten import IterNorm

Array = jax.Array


class Identity(nn.Module):
    """The activation normalizer of ``none``, ``weight`` and ``cosine``: returns ``x``.

    Attributes:
      dtype: if set, the output is cast to it (so a model can pass ``dtype`` to any
        normalizer); otherwise ``x`` is returned as is.
    """

    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask=None) -> Array:
        """Returns ``x`` (the arguments of the other normalizers are accepted and ignored)."""
        return x if self.dtype is None else jnp.asarray(x, self.dtype)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Everything a model needs to switch normalizer by one string.

    Attributes:
      name: the registry name.
      norm: ``norm(train, **fields) -> Module``, the activation normalizer; ``train`` is
        required (flax's rule: no silent training-mode default) and selects batch vs running
        statistics where it matters.
      late_norm: the normalizer for late stages; IBN-Net uses plain BatchNorm there,
        every other name returns ``norm``.
      dense: ``dense(features, **fields) -> Module``, the fully connected layer.
      conv: ``conv(features, kernel_size, **fields) -> Module``, the convolution.
      is_identity: True when ``norm`` does nothing (``none``, ``weight``, ``cosine``),
        so the model should give its layers a bias.
      batch_statistics: True when ``norm`` normalizes by statistics across the batch: its
        output depends on the other examples, it keeps running averages in ``batch_stats``,
        and ghost batches (``virtual_batch_size``) apply.
      residual_norm: ``residual_norm(train, **fields) -> Module``, a normalizer a residual
        model applies after the addition of a block (before its activation) in the early stages,
        or None: IBN-b's InstanceNorm (Pan et al. 2018), ``None`` for every other name.
    """

    name: str
    norm: Callable[..., nn.Module]
    late_norm: Callable[..., nn.Module]
    dense: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    is_identity: bool
    batch_statistics: bool
    residual_norm: Callable[..., nn.Module] | None = None


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One registry row: which layers a name configures, and where its overrides go."""

    norm: type[nn.Module]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    dense: type[nn.Module] = nn.Dense
    conv: type[nn.Module] = nn.Conv
    # "norm": overrides configure the activation normalizer; "linear": the dense and conv layers.
    configures: str = "norm"
    late_norm: type[nn.Module] | None = None  # IBN-Net: a different normalizer in late stages
    switches: dict[str, type[nn.Module]] = dataclasses.field(default_factory=dict)  # flag -> norm
    residual_norm: type[nn.Module] | None = None  # IBN-b: after the residual addition, early stages


_TABLE: dict[str, _Entry] = {
    "batch": _Entry(BatchNorm),
    "batch_renorm": _Entry(BatchRenorm),
    "instance": _Entry(InstanceNorm),
    "layer": _Entry(LayerNorm),
    # 4 groups divide every width of the CIFAR models (8 to 64 channels); flax's 32 does not.
    "group": _Entry(GroupNorm, {"num_groups": 4}),
    "rms": _Entry(RMSNorm),
    # The WeightNorm paper adds a mean-only BatchNorm after each layer: mean_only_bn=True.
    "weight": _Entry(Identity, dense=WeightNormDense, conv=WeightNormConv, configures="linear",
                     switches={"mean_only_bn": MeanOnlyBatchNorm}),
    "cosine": _Entry(Identity, dense=CosineDense, conv=CosineConv, configures="linear"),
    "ibn": _Entry(IBN, late_norm=BatchNorm),
    # IBN-b (Pan et al. 2018): BatchNorm everywhere, and an affine InstanceNorm after the residual
    # addition of the last block of the early stages.
    "ibn_b": _Entry(BatchNorm, residual_norm=InstanceNorm),
    "none": _Entry(Identity),
    # Santurkar et al. 2018's variants: BatchNorm plus a deliberate covariate shift (needs the
    # rng stream "noise"), and normalization by the L1 / L2 / L-infinity deviation.
    "noisy_batch": _Entry(NoisyBatchNorm),
    "l1_batch": _Entry(LpBatchNorm, {"p": 1}),
    "l2_batch": _Entry(LpBatchNorm, {"p": 2}),
    "linf_batch": _Entry(LpBatchNorm, {"p": math.inf}),
    # Fine-tuning: BatchNorm's variables, fixed (statistics never updated, no gradient to them or
    # to the affine parameters); a trained "batch" checkpoint loads unchanged.
    "frozen_batch": _Entry(FrozenBatchNorm),
    # Normalizers ported from PyTorch (timm): FRN with its TLU and EvoNorm-S0/B0 are
    # normalization-activation layers (the models' ReLU after them stays); GRN (ConvNeXt V2)
    # starts as the identity. EvoNorm-S0 takes GroupNorm's 4 groups here.
    "frn": _Entry(FilterResponseNorm),
    "grn": _Entry(GlobalResponseNorm),
    # BiT's recipe (Kolesnikov et al. 2020): GroupNorm after weight-standardized convolutions.
    "group_ws": _Entry(GroupNorm, {"num_groups": 4}, dense=StdDense, conv=StdConv),
    "evonorm_s0": _Entry(EvoNormS0, {"num_groups": 4}),
    "evonorm_b0": _Entry(EvoNormB0),
    # IterNorm (Huang et al. 2019): the channels whitened in groups of 64 (one group of all of
    # them in layers with fewer, as every layer of the CIFAR models), T = 5 Newton-Schulz steps.
    "iter": _Entry(IterNorm),
}


def available() -> list[str]:
    """Names accepted by :func:`make`, in a stable order."""
    return list(_TABLE)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}


def _norm_factory(cls: type[nn.Module], overrides: dict[str, Any]):
    def norm(train: bool, **fields) -> nn.Module:
        kw = {**overrides, **fields}
        if "use_running_average" in _fields(cls):
            kw.setdefault("use_running_average", not train)
        return cls(**kw)

    norm.__doc__ = f"Returns a configured {cls.__name__}; ``train`` picks batch vs running statistics."
    return norm


def make(name: str, **overrides: Any) -> Normalizer:
    """Returns the :class:`Normalizer` registered under ``name``.

    Overrides reach the layer that the name configures: the activation normalizer
    (``make("batch_renorm", r_max=2.0)``), or for ``weight`` and ``cosine`` the linear
    layers (``make("cosine", use_scale=True)``). ``make("weight", mean_only_bn=True)``
    adds the mean-only BatchNorm that the WeightNorm paper recommends after each layer.

    Example:
      >>> import normzoo
      >>> spec = normzoo.make("batch_renorm", r_max=2.0)
      >>> type(spec.norm(train=True)).__name__, spec.norm(train=False).use_running_average
      ('BatchRenorm', True)

    Raises:
      ValueError: unknown name (the message lists the known ones).
      TypeError: an override that the configured layer has no field for.
    """
    return _make(name, overrides, _LINEN)


@dataclasses.dataclass(frozen=True)
class _Api:
    """How a registry row becomes layers of one Flax API (linen here; ``normzoo.nnx`` has its own)."""

    layer: Callable[[type], type]  # the API's class for a row's (linen) class
    fields: Callable[[type], set[str]]  # the keyword arguments a class accepts as overrides
    norm_factory: Callable[[type, dict[str, Any]], Callable[..., Any]]


_LINEN = _Api(layer=lambda cls: cls, fields=_fields, norm_factory=_norm_factory)


def _make(name: str, overrides: dict[str, Any], api: _Api) -> Normalizer:
    if name not in _TABLE:
        raise ValueError(f"unknown normalizer {name!r}; known names: {', '.join(available())}.")
    entry = _TABLE[name]
    overrides = {**entry.defaults, **overrides}
    norm_cls = entry.norm
    for flag, cls in entry.switches.items():
        if overrides.pop(flag, False):
            norm_cls = cls
    row_cls, norm_cls, dense, conv = norm_cls, api.layer(norm_cls), api.layer(entry.dense), api.layer(entry.conv)
    if entry.configures == "linear":
        target, allowed = f"{dense.__name__}/{conv.__name__}", api.fields(dense) & api.fields(conv)
    else:
        target, allowed = norm_cls.__name__, api.fields(norm_cls)
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise TypeError(
            f"make({name!r}): {bad} are not fields of {target}; valid overrides: "
            f"{sorted(allowed | set(entry.switches))}."
        )
    linear, layer = (overrides, {}) if entry.configures == "linear" else ({}, overrides)
    norm = api.norm_factory(norm_cls, layer)
    late = norm
    if entry.late_norm is not None:
        late_cls = api.layer(entry.late_norm)
        late = api.norm_factory(late_cls, {k: v for k, v in layer.items() if k in api.fields(late_cls)})
    residual = None
    if entry.residual_norm is not None:
        residual = api.norm_factory(api.layer(entry.residual_norm), {})
    return Normalizer(
        name, norm, late, functools.partial(dense, **linear), functools.partial(conv, **linear),
        is_identity=row_cls is Identity, batch_statistics="virtual_batch_size" in _fields(row_cls),
        residual_norm=residual,
    )
