"""normzoo: normalization layers for Flax, numerically safe and synced across devices."""

from normzoo._batch import (BatchNorm, BatchRenorm, EvoNormB0, FrozenBatchNorm, LpBatchNorm, MeanOnlyBatchNorm,
                            NoisyBatchNorm)
from normzoo._composite import IBN
from normzoo._freeze import batch_norm_mask, freeze_batch_norm
from normzoo._registry import Identity, Normalizer, available, make
from normzoo._sample import (EvoNormS0, FilterResponseNorm, GlobalResponseNorm, GroupNorm, InstanceNorm, LayerNorm,
                             RMSNorm)
from normzoo._stats import moments, sync_batch_stats
from normzoo._weight import (CosineConv, CosineDense, ScaledStdConv, ScaledStdDense, StdConv, StdDense, WeightNormConv,
                             WeightNormDense)
from normzoo._whiten import IterNorm
from normzoo._wrap import SpectralNorm, WeightNorm
from normzoo import functional, sbx  # noqa: E402  (normzoo.sbx.BatchRenorm: drop-in for sbx / CrossQ)

__version__ = "0.2.0"

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "CosineConv",
    "CosineDense",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "FrozenBatchNorm",
    "GlobalResponseNorm",
    "GroupNorm",
    "IBN",
    "Identity",
    "InstanceNorm",
    "IterNorm",
    "LayerNorm",
    "LpBatchNorm",
    "MeanOnlyBatchNorm",
    "NoisyBatchNorm",
    "Normalizer",
    "RMSNorm",
    "ScaledStdConv",
    "ScaledStdDense",
    "SpectralNorm",
    "StdConv",
    "StdDense",
    "WeightNorm",
    "WeightNormConv",
    "WeightNormDense",
    "available",
    "batch_norm_mask",
    "freeze_batch_norm",
    "functional",
    "make",
    "moments",
    "sync_batch_stats",
]
