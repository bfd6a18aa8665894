"""One string picks the normalizer of a whole model: ``normzoo.make(name, **overrides)``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normzoo._batch import BatchNorm, BatchRenorm, MeanOnlyBatchNorm
from normzoo._composite import IBN
from normzoo._sample import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from normzoo._weight import CosineConv, CosineDense, WeightNormConv, WeightNormDense

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
      norm: ``norm(train, **fields) -> Module``, the activation normalizer; called as
        ``module(x)`` (``train`` selects batch vs running statistics where it matters).
      late_norm: the normalizer for late stages; IBN-Net uses plain BatchNorm there,
        every other name returns ``norm``.
      dense: ``dense(features, **fields) -> Module``, the fully connected layer.
      conv: ``conv(features, kernel_size, **fields) -> Module``, the convolution.
      is_identity: True when ``norm`` does nothing (``none``, ``weight``, ``cosine``),
        so the model should give its layers a bias.
    """

    name: str
    norm: Callable[..., nn.Module]
    late_norm: Callable[..., nn.Module]
    dense: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    is_identity: bool


_TRAINABLE = (BatchNorm, BatchRenorm, MeanOnlyBatchNorm, IBN)

# name -> (activation normalizer, default overrides, dense, conv)
_TABLE: dict[str, tuple[type[nn.Module], dict[str, Any], Any, Any]] = {
    "batch": (BatchNorm, {}, nn.Dense, nn.Conv),
    "batch_renorm": (BatchRenorm, {}, nn.Dense, nn.Conv),
    "instance": (InstanceNorm, {}, nn.Dense, nn.Conv),
    "layer": (LayerNorm, {}, nn.Dense, nn.Conv),
    # 4 groups divide every width of the CIFAR models (8 to 64 channels); flax's 32 does not.
    "group": (GroupNorm, {"num_groups": 4}, nn.Dense, nn.Conv),
    "rms": (RMSNorm, {}, nn.Dense, nn.Conv),
    "weight": (Identity, {}, WeightNormDense, WeightNormConv),
    "cosine": (Identity, {}, CosineDense, CosineConv),
    "ibn": (IBN, {}, nn.Dense, nn.Conv),
    "none": (Identity, {}, nn.Dense, nn.Conv),
}


def available() -> list[str]:
    """Names accepted by :func:`make`, in a stable order."""
    return list(_TABLE)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def _norm_factory(cls: type[nn.Module], overrides: dict[str, Any]):
    def norm(train: bool = True, **fields) -> nn.Module:
        kw = {**overrides, **fields}
        if cls in _TRAINABLE or (cls is InstanceNorm and kw.get("track_running_stats")):
            kw.setdefault("use_running_average", not train)
        return cls(**kw)

    norm.__doc__ = f"Returns a configured {cls.__name__}; ``train`` picks batch statistics."
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
    if name not in _TABLE:
        raise ValueError(f"unknown normalizer {name!r}; known names: {', '.join(available())}.")
    cls, defaults, dense, conv = _TABLE[name]
    overrides = {**defaults, **overrides}
    if name in ("weight", "cosine"):
        mean_only = overrides.pop("mean_only_bn", False) if name == "weight" else False
        allowed = _fields(dense) & _fields(conv)
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise TypeError(
                f"make({name!r}): {bad} are not fields of {dense.__name__}/{conv.__name__}; "
                f"valid overrides: {sorted(allowed | ({'mean_only_bn'} if name == 'weight' else set()))}."
            )
        dense = functools.partial(dense, **overrides)
        conv = functools.partial(conv, **overrides)
        norm = _norm_factory(MeanOnlyBatchNorm if mean_only else Identity, {})
        return Normalizer(name, norm, norm, dense, conv, is_identity=not mean_only)
    bad = sorted(set(overrides) - _fields(cls))
    if bad:
        raise TypeError(
            f"make({name!r}): {bad} are not fields of {cls.__name__}; valid overrides: "
            f"{sorted(_fields(cls))}."
        )
    norm = _norm_factory(cls, overrides)
    late = norm
    if cls is IBN:
        late = _norm_factory(BatchNorm, {k: v for k, v in overrides.items() if k != "ratio"})
    return Normalizer(name, norm, late, dense, conv, is_identity=cls is Identity)
