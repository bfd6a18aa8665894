"""Drop-in for the BatchRenorm layer of sbx and CrossQ (``sbx/common/jax_layers.py``).

Reinforcement-learning code that copied sbx's flax.linen ``BatchRenorm`` (CrossQ's critics, Bhatt
et al. ICLR 2024) switches to normzoo by changing one import::

    from normzoo.sbx import BatchRenorm   # was: from sbx.common.jax_layers import BatchRenorm

and keeps its checkpoints: the same fields in the same order with the same defaults
(``epsilon=1e-3``, ``warmup_steps=100_000``), the same ``batch_stats`` (``mean``, ``var``,
``r_max``, ``d_max``, ``steps``) and the same formula, so outputs, running statistics and
gradients agree with sbx's layer to float32 rounding. sbx's own ``CrossQ`` (whose policies bind the
name at import) switches with one call, :func:`use_in_sbx`. What normzoo adds stays: the variance
is always computed stably (sbx uses flax's fast ``E[x^2] - E[x]^2``, which loses digits where
``|mean| >> std``), ``mask=`` at call time, synced statistics with one collective weighted by each
device's valid elements, and ghost batches (``virtual_batch_size``).

Training curves agree statistically, not bit for bit: an actor-critic loop amplifies the float32
rounding difference of the two variance formulas (sbx's layer with only its variance made stable
drifts from stock sbx exactly as fast), and the returns match.

:class:`normzoo.BatchRenorm` with ``warmup_schedule="step"`` is the same algorithm with the
paper's placement of epsilon; this class keeps sbx's, so that curves match to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import pkgutil
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers
from jax import lax

from normzoo import functional as F
from normzoo._batch import _Mapped
from normzoo._stats import AffineMap

Array = jax.Array
Initializer = Any

__all__ = ["BatchRenorm", "SbxSwitch", "use_in_sbx"]


class BatchRenorm(_Mapped):
    r"""Batch renormalization as sbx and CrossQ compute it; drop-in for ``sbx.common.jax_layers.BatchRenorm``.

    While fewer than ``warmup_steps`` training steps have been taken (``batch_stats['steps']``)
    this is BatchNorm over the batch. From then on, with batch statistics :math:`\mu_B, \sigma_B^2`,
    running statistics :math:`\mu, \sigma^2` and the bounds stored in ``batch_stats``:

    .. math::
        r = \mathrm{sg}\Big(\mathrm{clip}\big(\sqrt{\tfrac{\sigma_B^2 + \epsilon}{\sigma^2 + \epsilon}},
        \tfrac{1}{r_{max}}, r_{max}\big)\Big),\quad
        d = \mathrm{sg}\Big(\mathrm{clip}\big(\tfrac{\mu_B - \mu}{\sqrt{\sigma^2 + \epsilon}},
        -d_{max}, d_{max}\big)\Big)

    .. math::
        y = \gamma\, \frac{x - \mu_B + d\, \sigma_B / r}{\sqrt{\sigma_B^2 / r^2 + \epsilon}} + \beta

    (sbx's form: BatchNorm applied to the mean :math:`\mu_B - d \sigma_B / r` and variance
    :math:`\sigma_B^2 / r^2`; as :math:`\epsilon \to 0` it is the paper's :math:`(x - \mu_B) r / \sigma_B + d`).
    ``sg`` stops gradients. The running statistics move toward the batch's as in BatchNorm.
    At inference (``use_running_average``) :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`.
    Where a feature is constant (:math:`\sigma_B = 0`) the gradient through :math:`\sigma_B` is zero, not
    NaN.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from normzoo.sbx import BatchRenorm
      >>> x = jax.random.normal(jax.random.key(0), (256, 32))
      >>> layer = BatchRenorm(use_running_average=False, warmup_steps=2)
      >>> variables = layer.init(jax.random.key(1), x)
      >>> sorted(variables['batch_stats'])
      ['d_max', 'mean', 'r_max', 'steps', 'var']
      >>> y, upd = layer.apply(variables, x, mutable=['batch_stats'])
      >>> int(upd['batch_stats']['steps'])
      1

    Attributes:
      use_running_average: if True, normalize with the running statistics.
      axis: the feature axis (or axes).
      momentum: ``running = momentum * running + (1 - momentum) * batch``.
      epsilon: added to the variances (sbx's default 1e-3).
      warmup_steps: training steps of plain BatchNorm before renormalization starts
        (sbx's default 100,000; ``warm_up_steps`` in CrossQ's original code,
        also accepted as a keyword).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as flax.linen.BatchNorm.
      axis_name, axis_index_groups: synchronize the statistics across devices (one
        collective per call, every device weighted by its number of valid elements).
      use_fast_variance: (normzoo; CrossQ's original code has it, no released sbx does) accepted
        and ignored; the variance is always computed
        stably (a shifted second moment), which equals the fast one where that one is accurate.
      warm_up_steps: (keyword-only) CrossQ's original name of ``warmup_steps``; give one of them
        (given together with a ``warmup_steps`` other than the default, it is an error).
      virtual_batch_size: (keyword-only) ghost batches, as :class:`normzoo.BatchNorm`.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-3
    warmup_steps: int = 100_000
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    warm_up_steps: int | None = dataclasses.field(default=None, kw_only=True)
    virtual_batch_size: int | None = dataclasses.field(default=None, kw_only=True)

    @nn.nowrap
    def _map(self, x: Array, use_running_average: bool | None, mask: Array | None) -> AffineMap:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        warmup = self._warmup()
        shape = self._features(x)
        running = self._running(shape)
        bounds = [self.variable("batch_stats", name, lambda v=v: v) for name, v in (("r_max", 3), ("d_max", 5))]
        steps = self.variable("batch_stats", "steps", lambda: 0)
        scale, bias = self._affine(shape)
        # Before the warm-up ends, and under init, the bounds are (1, 0): plain BatchNorm.
        on = 0.0 if self.is_initializing() else (jnp.asarray(steps.value) >= warmup).astype(jnp.float32)
        r_max, d_max = 1.0 + (bounds[0].value - 1.0) * on, bounds[1].value * on

        def correction(mean, var, inv, run_mean, run_var, valid):
            # sbx's form: BatchNorm of the mean mu_B - d sigma_B / r and the variance sigma_B^2 / r^2.
            r, d = F.renorm_correction(mean, inv, run_mean, run_var, self.epsilon, r_max, d_max, valid)
            inv = lax.rsqrt(var / r**2 + self.epsilon)
            return inv, d * _sqrt(var) / r * inv

        mean, var = self._read(running, not use_ra)
        amap, new = F._batch_map(x, mean, var, scale, bias, training=not use_ra, correction=correction,
                                 **self._options(mask))
        self._store(running, new, x, not use_ra)
        if not use_ra and not self.is_initializing():
            steps.value = steps.value + 1
        return amap

    @nn.nowrap
    def _warmup(self) -> int:
        if self.warm_up_steps is not None and self.warmup_steps != 100_000:
            raise ValueError(
                f"BatchRenorm: warmup_steps={self.warmup_steps!r} and warm_up_steps="
                f"{self.warm_up_steps!r} were both given; they are the same field (its name "
                "in CrossQ's code and in sbx): give one."
            )
        warmup = self.warmup_steps if self.warm_up_steps is None else self.warm_up_steps
        # sbx compares the step count with whatever number it is given (1e5 from a config too).
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Real) or not warmup >= 0:
            raise ValueError(f"BatchRenorm: warmup_steps={warmup!r} must be a number >= 0.")
        return warmup


def _sqrt(v: Array) -> Array:
    """``sqrt(v)`` whose derivative at ``v = 0`` is 0 instead of infinite."""
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, v, 1.0)), 0.0)


# ----------------------------------------------------------------------------- sbx's own CrossQ


class SbxSwitch:
    """The modules :func:`use_in_sbx` patched; :meth:`undo` (or leaving the ``with`` block) puts
    sbx's layer back. ``modules`` lists the patched module names."""

    def __init__(self, patched: dict[str, Any]):
        self._patched = patched  # module name -> the object it bound before

    @property
    def modules(self) -> list[str]:
        return sorted(self._patched)

    def undo(self) -> None:
        """Puts sbx's own ``BatchRenorm`` back in every module patched (idempotent)."""
        for name, original in self._patched.items():
            module = sys.modules.get(name)
            if module is not None and getattr(module, "BatchRenorm", None) is BatchRenorm:
                setattr(module, "BatchRenorm", original)
        self._patched = {}

    def __enter__(self) -> SbxSwitch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def use_in_sbx() -> SbxSwitch:
    """Makes sbx's own networks (CrossQ's critics and actors, any sbx policy that uses
    ``BatchRenorm``) build normzoo's :class:`BatchRenorm` instead of sbx's, in one call.

    sbx's policies bind the name at import (``from sbx.common.jax_layers import BatchRenorm``), so
    patching ``sbx.common.jax_layers`` alone changes nothing: this imports every ``sbx`` module and
    replaces the name wherever it is bound to sbx's class. The networks look the class up each time
    they are traced, so keep the switch on while the model trains and predicts; ``undo()`` (or the
    end of a ``with`` block) restores sbx's layer. Checkpoints are unaffected: the layer has sbx's
    name, fields and variables.

    Example (needs ``pip install 'normzoo[rl]'``)::

        import normzoo.sbx
        from sbx import CrossQ

        switch = normzoo.sbx.use_in_sbx()      # or: with normzoo.sbx.use_in_sbx(): ...
        model = CrossQ("MlpPolicy", "Pendulum-v1")
        model.learn(5_000)
        switch.undo()

    Raises:
      ModuleNotFoundError: sbx is not installed (the message says how to install it).
    """
    try:
        import sbx
        from sbx.common import jax_layers
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "normzoo.sbx.use_in_sbx: sbx is not installed, so there is nothing to switch; install it "
            "with `pip install 'normzoo[rl]'` (sbx-rl and gymnasium; install a CPU build of torch first "
            "where you have no GPU). To use normzoo's layer in your own code, import "
            "`normzoo.sbx.BatchRenorm` instead."
        ) from e
    original = jax_layers.BatchRenorm
    for info in pkgutil.walk_packages(sbx.__path__, "sbx."):
        try:
            importlib.import_module(info.name)
        except Exception:  # an optional part of sbx whose dependencies are absent: it binds nothing
            continue
    patched = {}
    for name, module in list(sys.modules.items()):
        if (name == "sbx" or name.startswith("sbx.")) and getattr(module, "BatchRenorm", None) is original:
            patched[name] = original
            setattr(module, "BatchRenorm", BatchRenorm)
    return SbxSwitch(patched)
