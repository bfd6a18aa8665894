"""Largest error of every layer against a float64 NumPy reference, next to flax.linen's.

    python -m benchmarks.accuracy

Inputs (float32, 64x8x8x16 for the convolutional layers, 16x64x256 for LayerNorm/RMSNorm):
``normal`` (N(0.5, 2)), ``large_mean`` (N(1e4, 1): where E[x^2] - E[x]^2 fails) and
``constant_channel`` (one channel constant: the variance is 0, the output must be 0, never NaN).
The reference sees exactly the float32 values the layers see, cast to float64.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import normzoo
from benchmarks import save


def _inputs(shape, seed=0):
    r = np.random.default_rng(seed)
    const = r.normal(size=shape) * 2 + 0.5
    const[..., 0] = 3.25
    return {
        "normal": (r.normal(size=shape) * 2 + 0.5).astype(np.float32),
        "large_mean": (r.normal(size=shape) + 1e4).astype(np.float32),
        "constant_channel": const.astype(np.float32),
    }


def _bn_ref(x, axes, eps):
    x = x.astype(np.float64)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)


def _gn_ref(x, groups, eps):
    g = x.astype(np.float64).reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    return _bn_ref(g, (1, 2, 4), eps).reshape(x.shape)


CASES = [
    # name, normzoo layer, flax layer, reference, input shape
    ("BatchNorm", normzoo.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False),
     lambda x: _bn_ref(x, (0, 1, 2), 1e-5), (64, 8, 8, 16)),
    ("BatchRenorm (r_max=1, d_max=0)", normzoo.BatchRenorm(use_running_average=False, r_max=1.0, d_max=0.0),
     None, lambda x: _bn_ref(x, (0, 1, 2), 1e-5), (64, 8, 8, 16)),
    ("IBN (ratio 0.5)", normzoo.IBN(use_running_average=False), None,
     lambda x: np.concatenate([_bn_ref(x[..., :8], (1, 2), 1e-5), _bn_ref(x[..., 8:], (0, 1, 2), 1e-5)], -1),
     (64, 8, 8, 16)),
    ("InstanceNorm", normzoo.InstanceNorm(), nn.InstanceNorm(), lambda x: _bn_ref(x, (1, 2), 1e-6), (64, 8, 8, 16)),
    ("GroupNorm (4 groups)", normzoo.GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4),
     lambda x: _gn_ref(x, 4, 1e-6), (64, 8, 8, 16)),
    ("LayerNorm", normzoo.LayerNorm(), nn.LayerNorm(), lambda x: _bn_ref(x, (-1,), 1e-6), (16, 64, 256)),
    ("RMSNorm", normzoo.RMSNorm(), nn.RMSNorm(),
     lambda x: x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6), (16, 64, 256)),
]


def _err(module, x, ref):
    if module is None:
        return None
    variables = module.init(jax.random.key(0), x)
    y = module.apply(variables, x, mutable=["batch_stats"])
    y = np.asarray(y[0] if isinstance(y, tuple) else y, np.float64)
    if not np.all(np.isfinite(y)):
        return float("nan")
    return float(np.abs(y - ref).max())


def run() -> dict:
    rows = []
    for name, ours, theirs, ref_fn, shape in CASES:
        for case, x in _inputs(shape).items():
            ref = ref_fn(x)
            rows.append({"layer": name, "input": case, "normzoo": _err(ours, jnp.asarray(x), ref),
                         "flax": _err(theirs, jnp.asarray(x), ref)})
    return {"jax": jax.__version__, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = ["| layer | input | normzoo max abs error | flax.linen max abs error |", "| --- | --- | ---: | ---: |"]
    fmt = lambda v: "n/a" if v is None else ("NaN" if v != v else f"{v:.1e}")  # noqa: E731
    lines += [f"| {r['layer']} | {r['input']} | {fmt(r['normzoo'])} | {fmt(r['flax'])} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    result = run()
    print(save(result, "benchmarks/results", "accuracy", to_markdown))


if __name__ == "__main__":
    main()
