r"""PyTorch checkpoints in and out of Flax (linen) models: :func:`from_torch` / :func:`to_torch`
(an explicit mapping), :func:`port_torch` (the mapping derived from the two models and checked
against PyTorch's outputs) and :func:`torch_activations` (PyTorch's per-module outputs, for that
check). Everything but :func:`torch_activations` takes NumPy arrays: torch is not needed.

Re-exported by :mod:`normzoo.deploy`; documented there.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from normzoo._sample import InstanceNorm

__all__ = ["Port", "from_torch", "port_torch", "to_torch", "torch_activations"]

# PyTorch leaf -> (flax collection, flax name), per kind of module.
_TORCH_NORM = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
               "v": ("params", "v"), "tau": ("params", "tau")}  # timm's EvoNorm gate, FRN's threshold
_TORCH_LINEAR = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
_TORCH_EMBEDDING = {"weight": ("params", "embedding")}  # nn.Embedding -> nn.Embed, same layout
_TORCH_WEIGHT_NORM = {"weight_g": ("params", "g"), "weight_v": ("params", "v"), "bias": ("params", "bias")}
# torch.nn.utils.parametrizations.weight_norm stores g and v as `<module>.parametrizations.weight.original0/1`.
_PARAMETRIZED = ".parametrizations.weight"
_ORIGINAL = {"original0": "weight_g", "original1": "weight_v"}
# The order in which a PyTorch module registers them (state_dict order); bare parameters go last.
_TORCH_ORDER = {"weight": 0, "weight_g": 0, "weight_v": 1, "bias": 2, "v": 3, "tau": 3, "running_mean": 4,
                "running_var": 5}


def _torch_kernel_to_flax(w: np.ndarray, transpose: bool | None = None) -> np.ndarray:
    """Linear ``(out, in)`` -> ``(in, out)``; ConvNd ``(out, in/groups, *k)`` -> ``(*k, in/groups, out)``.

    ConvTransposeNd ``(in, out/groups, *k)``: ``transpose`` is the Flax layer's
    ``transpose_kernel``: False (flax's default) takes the spatially flipped kernel
    ``(*k, in, out)``, True the kernel of the forward convolution ``(*k, out, in)``."""
    if w.ndim == 2:
        return np.transpose(w)
    spatial = tuple(range(2, w.ndim))
    if transpose is None:
        return np.transpose(w, spatial + (1, 0))
    if transpose:
        return np.transpose(w, spatial + (1, 0))
    return np.transpose(np.flip(w, spatial), spatial + (0, 1))


def _flax_kernel_to_torch(k: np.ndarray, transpose: bool | None = None) -> np.ndarray:
    if k.ndim == 2:
        return np.transpose(k)
    n = k.ndim - 2
    if transpose is None or transpose:
        return np.transpose(k, (n + 1, n) + tuple(range(n)))
    return np.flip(np.transpose(k, (n, n + 1) + tuple(range(n))), tuple(range(2, k.ndim)))


def _variance_ratio(batch_elements, tracked, momentum, where=""):
    """``(m_T, c)``: PyTorch's running variance averages unbiased batch variances. With every
    batch of ``batch_elements`` values per channel, starting from 1 and ``tracked`` updates of
    PyTorch momentum ``momentum``: ``flax = m_T + c (torch - m_T)``, ``m_T = (1 - momentum)^T``,
    ``c = (n - 1) / n``."""
    n = int(batch_elements)
    if n < 2:
        raise ValueError(f"batch_elements={batch_elements!r}{where} must be >= 2 (values per channel per batch).")
    return (1.0 - momentum) ** int(tracked), (n - 1) / n


def _per_prefix(value, prefix):
    """An argument given as one number for every module or as a mapping PyTorch prefix -> number."""
    if value is None or isinstance(value, (int, np.integer)):
        return value
    return value.get(prefix)


def _shape(a) -> tuple[int, ...]:
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)


def _group_state_dict(state_dict: Mapping[str, Any], keys: dict | None = None) -> dict[str, dict[str, Any]]:
    """``{module prefix: {leaf: value}}`` in the state dict's order; weight-norm parametrizations
    (``m.parametrizations.weight.original0/1``) are filed under ``m`` as ``weight_g`` / ``weight_v``.
    ``keys`` (if given) receives ``(prefix, leaf) -> the state dict's key``."""
    by_module: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _ORIGINAL and (prefix.endswith(_PARAMETRIZED) or prefix == _PARAMETRIZED[1:]):
            prefix, leaf = prefix[: -len(_PARAMETRIZED)], _ORIGINAL[leaf]
        by_module.setdefault(prefix, {})[leaf] = value
        if keys is not None:
            keys[(prefix, leaf)] = key
    return by_module


def _group_key(key: str) -> str:
    """The module prefix a state dict key is filed under (see :func:`_group_state_dict`)."""
    return next(iter(_group_state_dict({key: None})))


def _table(entries: Collection[str], flax_names: Collection[str]) -> dict[str, tuple[str, str]]:
    if "weight_v" in entries or "weight_g" in entries:
        return _TORCH_WEIGHT_NORM
    if "kernel" in flax_names:
        return _TORCH_LINEAR
    if "embedding" in flax_names:
        return _TORCH_EMBEDDING
    return _TORCH_NORM


def from_torch(state_dict: Mapping[str, Any], template: Mapping, names: Mapping[str, str | None], *,
               batch_elements: int | Mapping[str, int] | None = None, momentum: float = 0.1,
               conv_transpose: Mapping[str, bool] | None = None, _keys: dict | None = None) -> dict:
    """Converts a PyTorch ``state_dict`` into Flax variables shaped like ``template``.

    ``names`` maps each PyTorch module prefix to the Flax module path (``'/'``-joined) it
    becomes, e.g. ``{'conv1': 'Conv_0', 'bn1': 'BatchNorm_0', 'fc': 'Dense_0'}`` (``None``: leave
    that PyTorch module out). :func:`port_torch` derives it. Per module:

    * ``nn.Linear`` / ``nn.ConvNd`` (grouped and depthwise too) ``weight`` -> ``kernel``
      (``(out, in)`` -> ``(in, out)``, ``OIHW`` -> ``HWIO``), ``bias`` -> ``bias``;
    * ``nn.ConvTransposeNd``, whose weight is ``(in, out, *k)`` and which a state dict cannot
      tell from a convolution: list its prefix in ``conv_transpose`` with the Flax
      ``ConvTranspose``'s ``transpose_kernel`` (``{'up': False}``): False takes the spatially
      flipped kernel, True the forward convolution's. PyTorch's ``padding=p`` is Flax's
      ``padding=((d (k - 1) - p, d (k - 1) - p + output_padding),) * 2`` (``d`` the dilation);
    * weight norm (``torch.nn.utils.weight_norm``'s ``weight_g`` / ``weight_v``, or
      ``parametrizations.weight.original0`` / ``original1``) -> normzoo's ``WeightNormDense`` /
      ``WeightNormConv`` ``g`` / ``v``;
    * ``nn.BatchNormNd`` / ``nn.LayerNorm`` / ``nn.GroupNorm`` ``weight`` -> ``scale``, ``bias``
      -> ``bias``, ``running_mean`` / ``running_var`` -> ``batch_stats`` ``mean`` / ``var``;
      ``num_batches_tracked`` -> ``steps`` where the layer has one (BatchRenorm), else it is
      only read for the variance conversion; torchvision's ``FrozenBatchNorm2d`` and timm's
      ``EvoNorm2dB0`` / ``EvoNorm2dS0`` / ``FilterResponseNormTlu2d`` / ``GlobalResponseNorm``
      likewise, with timm's ``v`` -> ``v`` and ``tau`` -> ``tau``;
    * any other parameter (ConvNeXt's ``layer_scale``) -> the Flax parameter of the same name at
      that path, reshaped where only unit axes differ (``(C, 1, 1)`` -> ``(C,)``).

    PyTorch's running variance averages *unbiased* batch variances; flax's and normzoo's
    average biased ones. With ``batch_elements`` (values per channel in one training batch,
    e.g. ``N * H * W``; one number, or one per PyTorch prefix: a CNN's stages see different
    ``H * W``) the stored variance is converted exactly (``num_batches_tracked`` updates of
    PyTorch's ``momentum``, 0.1 by default: flax's 0.9); without it, it is kept (both
    estimate the same population variance; they differ by a factor ``n / (n - 1)``, and
    inference gives PyTorch's outputs). Convert to continue training as PyTorch would have; use
    ``momentum=0.9`` in normzoo's layers to train on as PyTorch did.

    Build the Flax layers with PyTorch's settings: ``epsilon=1e-5`` for LayerNorm and
    GroupNorm (flax's default is 1e-6; BatchNorm's 1e-5 is the same), ``momentum=0.9``.

    Every PyTorch entry must land and every ``template`` leaf must be filled, with the
    template's shape: anything else is a ValueError naming the key. The values are NumPy
    arrays (``tensor.numpy()``); torch is not needed. ``template`` may hold arrays or
    ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)``).

    Returns:
      Variables with ``template``'s structure and dtypes.
    """
    target = traverse_util.flatten_dict(nn.unbox(dict(template)))
    conv_transpose = dict(conv_transpose or {})
    out: dict[tuple[str, ...], Any] = {}
    source: dict = {}
    by_module = _group_state_dict(state_dict, source)
    for prefix, entries in by_module.items():
        if prefix not in names:
            key = f"{prefix}.{next(iter(entries))}"
            raise ValueError(f"from_torch: '{key}' has module prefix '{prefix}', which is not in `names`; "
                             "map it to a Flax module path (names[prefix] = 'Module_0/...'), or to None to leave it out.")
        module = names[prefix]
        if module is None:
            continue
        path = tuple(p for p in module.split("/") if p)
        here = {k[-1]: k for k in target if k[1:-1] == path}
        # A copy: tensor.numpy() shares the module's buffers, which training updates in place.
        entries = {leaf: np.array(v, copy=True) for leaf, v in entries.items()}
        tracked = entries.pop("num_batches_tracked", None)
        table = _table(entries, here)
        for leaf, value in entries.items():
            if leaf in here and here[leaf][0] == "params":  # a parameter of the same name: as it is
                collection, name = "params", leaf
            elif leaf in table:
                collection, name = table[leaf]
            else:
                raise ValueError(f"from_torch: '{prefix}.{leaf}' has no Flax counterpart "
                                 f"(known: {sorted(table) + ['num_batches_tracked']}, or a parameter of the "
                                 f"same name at '{names[prefix]}', which has {sorted(here)}).")
            flax_key = (collection,) + path + (name,)
            if flax_key not in target:
                raise ValueError(f"from_torch: '{prefix}.{leaf}' -> '{'/'.join(flax_key)}', which the template lacks "
                                 f"(its variables at '{names[prefix]}': "
                                 f"{sorted('/'.join(k) for k in target if k[1:-1] == path)}).")
            want = target[flax_key]
            if name == "kernel" or (name == "v" and value.ndim > 1):  # not timm's per-channel EvoNorm v
                value = np.ascontiguousarray(_torch_kernel_to_flax(value, conv_transpose.get(prefix)))
            elif name not in ("mean", "var") and value.shape != _shape(want) and \
                    tuple(d for d in value.shape if d != 1) == tuple(d for d in _shape(want) if d != 1):
                value = value.reshape(_shape(want))  # weight_g (C, 1, 1, 1), layer_scale (C, 1, 1)
            if name == "var" and (elements := _per_prefix(batch_elements, prefix)) is not None:
                if tracked is None:
                    raise ValueError(f"from_torch: converting '{prefix}.running_var' needs "
                                     f"'{prefix}.num_batches_tracked', which the state dict lacks.")
                if int(tracked) == 0 and not np.allclose(value, 1.0):
                    raise ValueError(f"from_torch: '{prefix}.running_var' has moved from its initial 1 but "
                                     f"'{prefix}.num_batches_tracked' is 0, so the number of updates is unknown "
                                     "(PyTorch's InstanceNorm never counts them; statistics set by hand neither): "
                                     "leave its variance unconverted "
                                     f"(no batch_elements for '{prefix}').")
                m_t, c = _variance_ratio(elements, tracked, momentum,
                                         f" (for '{prefix}')")
                value = m_t + c * (value - m_t)
            if value.shape != _shape(want):
                raise ValueError(f"from_torch: '{prefix}.{leaf}' gives shape {value.shape} for "
                                 f"'{'/'.join(flax_key)}', the template has {_shape(want)} (a LayerNorm over "
                                 "several axes is (C, H, W) in PyTorch and (H, W, C) in Flax: transpose it yourself).")
            out[flax_key] = jnp.asarray(value, want.dtype)
            if _keys is not None:  # where each variable came from, for Port.to_torch
                _keys.setdefault(prefix, {})["/".join(flax_key)] = source[(prefix, leaf)]
        steps = ("batch_stats",) + path + ("steps",)
        if tracked is not None and steps in target:
            out[steps] = jnp.asarray(tracked, target[steps].dtype)
    missing = [k for k in target if k not in out]
    if missing:
        raise ValueError("from_torch: no PyTorch entry for the template's "
                         + ", ".join(f"'{'/'.join(k)}'" for k in missing)
                         + "; add its module to `names` (or check the state dict).")
    return traverse_util.unflatten_dict(out)


def to_torch(variables: Mapping, names: Mapping[str, str | None], *,
             num_batches_tracked: int | Mapping[str, int] | None = None,
             batch_elements: int | Mapping[str, int] | None = None, momentum: float = 0.1,
             conv_transpose: Mapping[str, bool] | None = None, parametrizations: bool = False,
             shapes: Mapping[str, tuple[int, ...]] | None = None,
             torch_keys: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_torch`: a PyTorch ``state_dict`` of NumPy arrays
    (``{k: torch.from_numpy(v) for k, v in ...}`` loads with ``strict=True``).

    Normalizers with running statistics get ``num_batches_tracked`` (a layer's ``steps``
    where it has one, else the argument, one number or one per PyTorch prefix, else 0); with ``batch_elements`` (one number, or one
    per PyTorch prefix) the variance is converted to PyTorch's unbiased average (the inverse of
    :func:`from_torch`'s conversion, which needs the number of updates). That conversion assumes
    an EMA from 1 over batches of ``batch_elements`` values per channel: not for statistics from
    :func:`precise_batch_stats`. Weight-normalized layers give ``weight_g`` / ``weight_v``, or
    with ``parametrizations=True`` ``parametrizations.weight.original0`` / ``original1`` (what
    ``torch.nn.utils.parametrizations.weight_norm`` loads). ``shapes`` (PyTorch key -> shape,
    e.g. ``{k: v.shape for k, v in state_dict.items()}``) reshapes parameters whose PyTorch shape
    has extra unit axes; ``torch_keys`` (PyTorch prefix -> {Flax variable path
    ``'params/Gate_0/scale'`` -> PyTorch key}) names variables whose PyTorch name the rules cannot
    know (a bare parameter called ``scale``); :meth:`Port.to_torch` passes all of these. Every variable under a mapped
    path must have a PyTorch name and every mapped path must exist: otherwise a ValueError naming it.
    """
    flat = traverse_util.flatten_dict(nn.unbox(dict(variables)))
    conv_transpose = dict(conv_transpose or {})
    shapes = dict(shapes or {})
    torch_keys = dict(torch_keys or {})
    out: dict[str, np.ndarray] = {}
    for prefix, module in names.items():
        if module is None:
            continue
        path = tuple(p for p in module.split("/") if p)
        entries = {k: v for k, v in flat.items() if k[1:-1] == path}
        if not entries:
            raise ValueError(f"to_torch: names['{prefix}'] = '{module}', a path with no variables.")
        steps = entries.pop(("batch_stats",) + path + ("steps",), None)
        has_var = ("batch_stats",) + path + ("var",) in entries
        elements, given = _per_prefix(batch_elements, prefix), _per_prefix(num_batches_tracked, prefix)
        if has_var and steps is None and given is None and elements is not None:
            raise ValueError(f"to_torch: converting the variance of '{module}' needs its number of "
                             "updates: pass num_batches_tracked (it has no steps counter).")
        tracked = int(np.asarray(steps) if steps is not None else given or 0)
        module_out = {}  # (rank in PyTorch's order, key) -> value
        table = _table(("weight_v",) if ("params",) + path + ("g",) in entries else (), {k[-1] for k in entries})
        reverse = {v: k for k, v in table.items()}
        for key, value in entries.items():
            name = (key[0], key[-1])
            value = np.array(value, copy=True)
            if name in reverse:
                leaf = reverse[name]
            elif key[0] == "params":  # a bare parameter keeps its name
                leaf = key[-1]
            else:
                raise ValueError(f"to_torch: '{'/'.join(key)}' has no PyTorch counterpart.")
            if leaf in ("weight", "weight_v") and value.ndim >= 2 and name[1] in ("kernel", "v"):
                value = np.ascontiguousarray(_flax_kernel_to_torch(value, conv_transpose.get(prefix)))
            if name == ("batch_stats", "var") and elements is not None:
                m_t, c = _variance_ratio(elements, tracked, momentum, f" (for '{prefix}')")
                value = (m_t + (value - m_t) / c).astype(value.dtype)
            if leaf == "weight_g":
                v = np.asarray(flat[("params",) + path + ("v",)])
                value = value.reshape((-1,) + (1,) * (v.ndim - 1))
            if parametrizations and leaf in ("weight_g", "weight_v"):
                torch_key = f"{prefix}{_PARAMETRIZED}.original{0 if leaf == 'weight_g' else 1}".lstrip(".")
            else:
                torch_key = f"{prefix}.{leaf}" if prefix else leaf
            torch_key = torch_keys.get(prefix, {}).get("/".join(key), torch_key)
            if torch_key in shapes and tuple(shapes[torch_key]) != value.shape:
                value = value.reshape(tuple(shapes[torch_key]))
            module_out[(_TORCH_ORDER.get(leaf, len(_TORCH_ORDER)), torch_key)] = value
        if ("batch_stats",) + path + ("mean",) in flat:
            key = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
            module_out[(len(_TORCH_ORDER), key)] = np.asarray(tracked, np.int64)
        out.update((k, module_out[(r, k)]) for r, k in sorted(module_out, key=lambda rk: rk[0]))
    return out


# ----------------------------------------------------------------------------- automatic mapping

_KINDS = ("conv", "linear", "batch", "affine", "weight_norm", "params")


def _torch_kind(entries: Mapping[str, Any]) -> str:
    leaves = set(entries) - {"num_batches_tracked"}
    if "running_mean" in leaves:
        return "batch"
    if {"weight_g", "weight_v"} & leaves:
        return "weight_norm"
    if leaves <= {"weight", "bias"} and leaves:
        if "weight" not in leaves or ("bias" in leaves and _shape(entries["weight"]) == _shape(entries["bias"])):
            return "affine"  # a norm's scale and shift (LayerNorm over several axes: both (C, H, W))
        ndim = len(_shape(entries["weight"]))
        return "linear" if ndim == 2 else "conv" if ndim > 2 else "affine"
    return "params"


def _flax_kind(own: Mapping[tuple[str, str], Any], module: nn.Module | None) -> str:
    names = {n for _, n in own}
    collections = {c for c, _ in own}
    if ("batch_stats", "mean") in own and ("batch_stats", "var") in own:
        return "batch"
    if collections <= {"params"}:
        if {"v", "g"} <= names:
            return "weight_norm"
        if "kernel" in names and names <= {"kernel", "bias"}:
            return "linear" if len(_shape(own[("params", "kernel")])) == 2 else "conv"
        if names == {"embedding"}:
            return "linear"  # PyTorch's Embedding: a 2-D weight, as a Linear without bias
        if names <= {"scale", "bias"} and (module is None or type(module).__name__.endswith("Norm")):
            return "affine"  # a normalizer's (LayerNorm, GroupNorm, RMSNorm, InstanceNorm, ...)
    return "params"


@dataclasses.dataclass
class _FlaxLayer:
    path: str
    module: nn.Module | None  # None: mapped explicitly, not called on the sample
    kind: str
    own: dict  # (collection, name) -> shape-bearing leaf
    input_shape: tuple[int, ...] | None = None


def _trace(model: nn.Module, template: Mapping, args, method, kwargs, named=()) -> list[_FlaxLayer]:
    """The Flax modules that own variables, in the order they are first called (parents first);
    those not called on the sample are an error, unless ``named`` (explicitly mapped), then last."""
    flat = traverse_util.flatten_dict(nn.unbox(dict(template)))
    own_by_path: dict[tuple[str, ...], dict] = {}
    for key, value in flat.items():
        own_by_path.setdefault(key[1:-1], {})[(key[0], key[-1])] = value
    layers: dict[tuple[str, ...], _FlaxLayer] = {}

    def intercept(next_fun, call_args, call_kwargs, context):
        m = context.module
        path = m.path
        if path not in layers and path in own_by_path:  # its first call, by any method
            own = own_by_path[path]
            x = next((a for a in (*call_args, *call_kwargs.values()) if hasattr(a, "shape")), None)
            layers[path] = _FlaxLayer("/".join(path), m, _flax_kind(own, m), own,
                                      tuple(x.shape) if x is not None else None)
        return next_fun(*call_args, **call_kwargs)

    def run(variables):
        with nn.intercept_methods(intercept):
            return model.apply(variables, *args, method=method, **kwargs)

    jax.eval_shape(run, template)
    for p in own_by_path:
        if p not in layers and "/".join(p) in named:
            layers[p] = _FlaxLayer("/".join(p), None, _flax_kind(own_by_path[p], None), own_by_path[p])
    unseen = sorted("/".join(p) for p in own_by_path if p not in layers)
    if unseen:
        raise ValueError(f"port_torch: the Flax modules {unseen} hold variables but were not called on the sample "
                         "input (pass the arguments and keywords the model takes at inference, e.g. train=False), "
                         "or map them explicitly in `names`.")
    return list(layers.values())


def _expected_flax_shapes(entries: Mapping[str, Any], layer: _FlaxLayer) -> list[tuple[str, tuple, tuple | None]]:
    """``[(torch leaf, its shape in Flax's layout, the Flax variable's shape)]`` that differ."""
    here = {n: (c, n) for c, n in layer.own}
    table = _table(entries, here)
    transpose = getattr(layer.module, "transpose_kernel", None) if isinstance(layer.module, nn.ConvTranspose) else None
    bad: list[tuple[str, tuple, tuple | None]] = []
    for leaf, value in entries.items():
        if leaf == "num_batches_tracked":
            continue
        key = table.get(leaf) or here.get(leaf)
        if key is None or key not in layer.own:
            bad.append((leaf, _shape(value), None))
            continue
        shape, want = _shape(value), _shape(layer.own[key])
        if key[1] == "kernel" or (key[1] == "v" and len(shape) > 1):
            shape = _torch_kernel_to_flax(np.empty(shape, np.bool_), transpose).shape
        elif tuple(d for d in shape if d != 1) == tuple(d for d in want if d != 1):
            shape = want
        if shape != want:
            bad.append((leaf, _shape(value), want))
    return bad


def _describe_torch(prefix, entries):
    return f"'{prefix}' ({_torch_kind(entries)}: " + ", ".join(
        f"{leaf} {_shape(v)}" for leaf, v in entries.items() if leaf != "num_batches_tracked") + ")"


def _describe_flax(layer: _FlaxLayer):
    cls = type(layer.module).__name__ if layer.module is not None else "not called on the sample"
    return f"'{layer.path}' ({cls}: " + ", ".join(
        f"{n} {_shape(v)}" for (_, n), v in layer.own.items()) + ")"


def _pair(by_module, layers, explicit):
    """Pairs PyTorch modules with Flax layers kind by kind, in order; ValueError where that fails."""
    names = dict(explicit)
    taken = {p for p in explicit.values() if p is not None}
    flax_paths = {layer.path for layer in layers}
    for prefix, path in explicit.items():
        if prefix not in by_module:
            raise ValueError(f"port_torch: names has '{prefix}', which is no module prefix of the state dict "
                             f"(its prefixes start {list(by_module)[:5]}).")
        if path is not None and path not in flax_paths:
            raise ValueError(f"port_torch: names['{prefix}'] = '{path}', which is no Flax module with variables "
                             f"(they start {sorted(flax_paths)[:5]}).")
    torch_left = {k: [p for p, e in by_module.items() if p not in explicit and _torch_kind(e) == k] for k in _KINDS}
    flax_left = {k: [layer for layer in layers if layer.path not in taken and layer.kind == k] for k in _KINDS}
    for kind in _KINDS:
        ts, fs = torch_left[kind], flax_left[kind]
        if len(ts) != len(fs):
            raise ValueError(
                f"port_torch: the PyTorch state dict has {len(ts)} module(s) of kind '{kind}' and the Flax model "
                f"{len(fs)}, so they cannot be paired in order. PyTorch's: {[p for p in ts][:8]}"
                f"{' ...' if len(ts) > 8 else ''}; Flax's: {[f.path for f in fs][:8]}{' ...' if len(fs) > 8 else ''}. "
                "Map the ones without a counterpart explicitly, names={'torch.prefix': 'Flax/path'} "
                "(None leaves a PyTorch module out); the rest are paired automatically.")
        for prefix, layer in zip(ts, fs):
            bad = _expected_flax_shapes(by_module[prefix], layer)
            if bad:
                leaf, got, want = bad[0]
                raise ValueError(
                    f"port_torch: in order, PyTorch's {_describe_torch(prefix, by_module[prefix])} pairs with Flax's "
                    f"{_describe_flax(layer)}, and '{prefix}.{leaf}' {got} does not fit "
                    f"{'any variable there' if want is None else want}: the two models order their "
                    f"'{kind}' modules differently here. Map these keys explicitly, names={{'{prefix}': "
                    "'<Flax path>', ...}; the rest are paired automatically.")
            names[prefix] = layer.path
    return {p: names[p] for p in by_module}  # in the state dict's order


# ----------------------------------------------------------------------------- the checked port


def _relative_error(flax_out, torch_out) -> tuple[float, str]:
    """Max |difference| over max |PyTorch's value|, trying PyTorch's channels-first layout moved last."""
    y = np.asarray(flax_out, np.float64)
    t = np.asarray(torch_out, np.float64)
    candidates = []
    if t.ndim >= 3 and np.moveaxis(t, 1, -1).shape == y.shape:
        candidates.append(np.moveaxis(t, 1, -1))
    if t.shape == y.shape:
        candidates.append(t)
    squeezed = tuple(d for d in y.shape if d != 1)
    for c in (np.moveaxis(t, 1, -1) if t.ndim >= 3 else t, t):
        if not candidates and c.size == y.size and tuple(d for d in c.shape if d != 1) == squeezed:
            candidates.append(c.reshape(y.shape))  # (N, C, 1, 1) after pooling against (N, C)
    if not candidates and t.size == y.size and t.ndim and y.ndim and t.shape[-1] == y.shape[-1]:
        candidates.append(t.reshape(y.shape))  # leading axes merged on one side: (N * L, C) against (N, L, C)
    if not candidates:
        return math.inf, f"shape {y.shape} (Flax) vs {t.shape} (PyTorch)"
    scale = max(float(np.max(np.abs(t))), 1e-30) if t.size else 1.0
    return min(float(np.max(np.abs(y - c))) / scale if c.size else 0.0 for c in candidates), ""


@dataclasses.dataclass
class Port:
    """What :func:`port_torch` did: the Flax ``variables``, the mapping it used (``names``,
    PyTorch prefix -> Flax path, in the state dict's order; save it, edit it, pass it back as
    ``names=``), each module's ``kinds``, the per-layer ``batch_elements`` used to convert
    running variances (None: kept as PyTorch stored them), the outputs' relative error
    against PyTorch's (``output_error``), each mapped module's (``layer_errors``, PyTorch prefix
    -> error, where activations were given), and ``notes``. ``print(port)`` shows it as a table;
    :meth:`to_torch` writes a state dict PyTorch loads with ``strict=True``."""

    variables: dict
    names: dict[str, str | None]
    kinds: dict[str, str]
    batch_elements: dict[str, int] | None = None
    output_error: float | None = None
    layer_errors: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    conv_transpose: dict[str, bool] = dataclasses.field(default_factory=dict)
    parametrizations: bool = False
    momentum: float = 0.1
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    num_batches_tracked: dict[str, int] = dataclasses.field(default_factory=dict)
    torch_keys: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    left_out: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        rows = [("PyTorch", "Flax", "kind", "batch elements", "relative error")]
        for prefix, path in self.names.items():
            n = (self.batch_elements or {}).get(prefix)
            e = self.layer_errors.get(prefix)
            rows.append((prefix, "(left out)" if path is None else path, self.kinds.get(prefix, ""),
                         "" if n is None else str(n), "" if e is None else f"{e:.1e}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.output_error is not None:
            lines.append(f"outputs: relative error {self.output_error:.1e} against PyTorch's")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_torch(self, variables: Mapping | None = None, *, num_batches_tracked: int | None = None) -> dict:
        """``variables`` (default: the ported ones) as a PyTorch state dict of NumPy arrays, with
        this port's mapping, per-layer variance conversion, ConvTranspose and weight-norm layouts
        and PyTorch's keys and shapes, in the ported state dict's order; modules left out of the
        port (``names[prefix] = None``) come back as they were. ``num_batches_tracked`` defaults to
        the ported state dict's (pass the new count, or one per prefix, after training on in Flax)."""
        out = to_torch(self.variables if variables is None else variables, self.names,
                       num_batches_tracked=self.num_batches_tracked if num_batches_tracked is None
                       else num_batches_tracked, batch_elements=self.batch_elements,
                       momentum=self.momentum, conv_transpose=self.conv_transpose,
                       parametrizations=self.parametrizations, shapes=self.shapes, torch_keys=self.torch_keys)
        out.update((k, np.array(v, copy=True)) for k, v in self.left_out.items())
        return {**{k: out.pop(k) for k in self.shapes if k in out}, **out}


def _flax_activations(model, variables, args, method, kwargs, paths):
    acts = {}

    def intercept(next_fun, call_args, call_kwargs, context):
        y = next_fun(*call_args, **call_kwargs)
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path in paths and path not in acts and isinstance(y, jax.Array):
            acts[path] = np.asarray(y)
        return y

    with nn.intercept_methods(intercept):
        out = model.apply(variables, *args, method=method, **kwargs)
    return out, acts


def port_torch(model: nn.Module, state_dict: Mapping[str, Any], *args, template: Mapping | None = None,
               names: Mapping[str, str | None] | None = None, outputs: Any = None,
               activations: Mapping[str, Any] | None = None, tolerance: float = 1e-4,
               batch_elements: int | str | Mapping[str, int] | None = None, training_batch_size: int | None = None,
               momentum: float = 0.1, method: Callable | str | None = None, **kwargs) -> Port:
    r"""Ports a PyTorch ``state_dict`` into the Flax (linen) ``model``, deriving the mapping and
    checking the result against PyTorch's outputs.

    ``args`` (and ``kwargs``, e.g. ``train=False``) are a sample input in Flax's layout, as for
    ``model.apply``. The model is traced on it (no computation; ``template`` defaults to
    ``jax.eval_shape(model.init, ...)``): the modules that own variables, their kinds (conv,
    linear, batch, affine, weight_norm, other parameters), call order and the shapes of their
    inputs. The state dict's modules, in their order, get kinds from their entries (a
    ``running_mean``: batch; a 2-D / higher ``weight``: linear / conv; a 1-D ``weight``: affine;
    ...). They are paired kind by kind, in order, and every pair's shapes are checked; where
    that fails the error names the pair and asks for those keys in ``names`` (PyTorch prefix ->
    Flax path; None leaves a module out), which overrides the pairing for them only. Flax
    ``ConvTranspose`` layers get PyTorch's transposed-convolution kernels.

    The check: ``outputs`` (PyTorch's outputs on the same sample, NumPy; channels-first outputs
    are compared with their channel axis moved last) is compared with the Flax model's. Same-shape
    modules paired the wrong way round and padding that differs (``'SAME'`` against PyTorch's
    explicit padding) load without error: only outputs show them. With ``activations``
    (PyTorch's per-module outputs, :func:`torch_activations`; its ``''`` entry, the model's
    output, is the default ``outputs``) each mapped module's output is compared too, and a
    mismatch names the first module, in Flax's call order, that is off by more than
    ``tolerance`` (relative to the largest PyTorch value) and the last one that agrees. The check
    runs on PyTorch's variance as stored, i.e. on PyTorch's inference.

    Running variances: PyTorch averages unbiased batch variances, Flax biased ones (see
    :func:`from_torch`). ``batch_elements=None`` keeps PyTorch's (inference equals PyTorch's);
    ``'sample'`` converts each BatchNorm exactly with its own values per channel, ``N * H * W`` of
    its input on the sample (so pass a sample shaped like a training batch, or give
    ``training_batch_size`` and the sample's ``N`` is replaced by it; InstanceNorms keep theirs:
    PyTorch does not count their updates); an int or a mapping (PyTorch prefix -> int) gives
    them yourself. Convert to continue training as PyTorch would.

    Example (a state dict of NumPy arrays: ``{k: v.numpy() for k, v in net.state_dict().items()}``
    for ``net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))``; here
    written out, with PyTorch's eval-mode output computed by hand)::

      >>> import flax.linen as nn, numpy as np
      >>> import normzoo
      >>> from normzoo import deploy
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool = False):
      ...         x = nn.Dense(4)(x)
      ...         return normzoo.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
      >>> rng = np.random.default_rng(0)
      >>> W, b = rng.normal(size=(4, 3)), rng.normal(size=4)
      >>> state = {"0.weight": W, "0.bias": b, "1.weight": np.full(4, 2.0), "1.bias": np.zeros(4),
      ...          "1.running_mean": np.ones(4), "1.running_var": np.full(4, 4.0),
      ...          "1.num_batches_tracked": np.array(100)}
      >>> x = rng.normal(size=(5, 3)).astype(np.float32)
      >>> torch_out = (x @ W.T + b - 1.0) / np.sqrt(4.0 + 1e-5) * 2.0
      >>> port = deploy.port_torch(Net(), state, x, outputs=torch_out)
      >>> port.names
      {'0': 'Dense_0', '1': 'BatchNorm_0'}
      >>> bool(port.output_error < 1e-6)
      True

    Returns:
      A :class:`Port` (``.variables``, ``.names``, ``print(port)``, ``.to_torch()``).

    Raises:
      ValueError: kinds or shapes do not pair (naming the keys), a key is left unmapped, or the
        outputs differ from PyTorch's by more than ``tolerance`` (naming the first layer off).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"port_torch: model must be a flax.linen Module, got {type(model).__name__}; the state dict "
                        "comes second: port_torch(model, state_dict, *sample_args).")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"port_torch: state_dict must be a mapping of PyTorch keys to arrays "
                        f"({{k: v.numpy() for k, v in net.state_dict().items()}}), got {type(state_dict).__name__}.")
    if not args:
        raise TypeError("port_torch: pass a sample input after the state dict (Flax layout, e.g. NHWC), "
                        "as for model.apply: the mapping is derived by tracing the model on it.")
    if template is None:
        template = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method, **kwargs))
    by_module = _group_state_dict(state_dict)
    layers = _trace(model, template, args, method, kwargs, {p for p in (names or {}).values() if p is not None})
    mapping = _pair(by_module, layers, dict(names or {}))
    by_path = {layer.path: layer for layer in layers}
    kinds = {p: _torch_kind(e) for p, e in by_module.items()}
    transposed = {p: m for p, f in mapping.items()
                  if f is not None and isinstance(m := by_path[f].module, nn.ConvTranspose)}
    conv_transpose = {p: bool(m.transpose_kernel) for p, m in transposed.items()}
    parametrizations = any(k.rpartition(".")[0].endswith(_PARAMETRIZED) for k in state_dict)
    shapes = {k: _shape(v) for k, v in state_dict.items()}

    per_layer = _batch_elements(batch_elements, training_batch_size, mapping, by_path, kinds)
    torch_keys: dict[str, dict[str, str]] = {}
    raw = from_torch(state_dict, template, mapping, conv_transpose=conv_transpose, _keys=torch_keys)
    tracked = {p: int(np.asarray(e["num_batches_tracked"])) for p, e in by_module.items() if "num_batches_tracked" in e}
    port = Port(raw, mapping, kinds, per_layer, conv_transpose=conv_transpose, parametrizations=parametrizations,
                momentum=momentum, shapes=shapes, num_batches_tracked=tracked, torch_keys=torch_keys,
                left_out={k: np.array(v, copy=True) for k, v in state_dict.items()
                          if mapping.get(_group_key(k)) is None})
    if outputs is None and activations is not None and "" in activations:
        outputs = activations[""]
    if outputs is None and not activations:
        port.notes.append("not checked against PyTorch's outputs: pass outputs= or activations= (same-shape "
                          "modules in a different order, or different padding, load without error)")
        warnings.warn("port_torch: " + port.notes[-1], stacklevel=2)
    else:
        _check(port, model, raw, args, method, kwargs, outputs, activations, tolerance, by_path)
    if per_layer is not None:
        port.variables = from_torch(state_dict, template, mapping, batch_elements=per_layer, momentum=momentum,
                                    conv_transpose=conv_transpose)
    return port


def _batch_elements(batch_elements, training_batch_size, mapping, by_path, kinds):
    batch = [p for p, f in mapping.items() if f is not None and kinds[p] == "batch"]
    if batch_elements is None:
        if training_batch_size is not None:
            raise ValueError("port_torch: training_batch_size rescales batch_elements='sample'; pass both.")
        return None
    if isinstance(batch_elements, str):
        if batch_elements != "sample":
            raise ValueError(f"port_torch: batch_elements={batch_elements!r}; use 'sample' (each BatchNorm's "
                             "N*H*W on the sample input), an int, a mapping PyTorch prefix -> int, or None.")
        out = {}
        for p in batch:
            layer = by_path[mapping[p]]
            if isinstance(layer.module, InstanceNorm):  # per-example statistics; PyTorch counts no updates
                continue
            channels = int(np.prod(_shape(layer.own[("batch_stats", "mean")])))
            shape = layer.input_shape
            if shape is None:
                raise ValueError(f"port_torch: batch_elements='sample' needs the input of '{layer.path}' on the "
                                 f"sample, and it was not called with an array; give '{p}' its count in a mapping.")
            n = math.prod(shape) // channels
            if training_batch_size is not None:
                n = n // shape[0] * int(training_batch_size)
            out[p] = n
        return out
    if isinstance(batch_elements, (int, np.integer)):
        return {p: int(batch_elements) for p in batch}
    unknown = sorted(set(batch_elements) - set(batch))
    if unknown:
        raise ValueError(f"port_torch: batch_elements has {unknown}, which are no mapped BatchNorm prefixes "
                         f"(those are {batch[:6]}{' ...' if len(batch) > 6 else ''}).")
    return {p: int(batch_elements[p]) for p in batch if p in batch_elements}


def _check(port, model, variables, args, method, kwargs, outputs, activations, tolerance, by_path):
    paths = {f: p for p, f in port.names.items() if f is not None}
    y, acts = _flax_activations(model, variables, args, method, kwargs, set(paths) if activations else set())
    if outputs is not None:
        leaves_y, leaves_t = jax.tree.leaves(y), jax.tree.leaves(outputs)
        if len(leaves_y) != len(leaves_t):
            raise ValueError(f"port_torch: the Flax model returns {len(leaves_y)} array(s), outputs= holds "
                             f"{len(leaves_t)}.")
        errors = [_relative_error(a, b) for a, b in zip(leaves_y, leaves_t)]
        port.output_error = max(e for e, _ in errors)
        shape_note = next((s for _, s in errors if s), "")
    order = [layer.path for layer in by_path.values() if layer.path in paths]  # Flax's call order
    if activations:
        for path in order:
            prefix = paths[path]
            if prefix in activations and path in acts:
                error, note = _relative_error(acts[path], activations[prefix])
                if note:  # not comparable: say so rather than call it off
                    port.notes.append(f"not compared: PyTorch '{prefix}' -> Flax '{path}', {note}")
                else:
                    port.layer_errors[prefix] = error
    outputs_ok = port.output_error is None or port.output_error <= tolerance
    if outputs_ok and all(e <= tolerance for e in port.layer_errors.values()):
        return
    message = []
    if not outputs_ok:
        message.append(f"the Flax model's outputs differ from PyTorch's by {port.output_error:.2g} (relative"
                       f"{'; ' + shape_note if shape_note else ''}), more than tolerance={tolerance:g}.")
    elif port.output_error is not None:
        message.append(f"the Flax model's outputs agree with PyTorch's ({port.output_error:.2g}, relative), but "
                       f"modules inside differ by more than tolerance={tolerance:g}.")
    first = next((path for path in order if port.layer_errors.get(paths[path], 0.0) > tolerance), None)
    if first is not None:
        before = [path for path in order[: order.index(first)] if paths[path] in port.layer_errors]
        message.append(
            f"The first module off, in call order: PyTorch '{paths[first]}' -> Flax '{first}' "
            f"({_describe_flax(by_path[first])}), relative error {port.layer_errors[paths[first]]:.2g}"
            + (f"; the last that agrees: '{paths[before[-1]]}' -> '{before[-1]}'." if before else
               "; it is the first module checked.")
            + " Look there and just before it: a mapping to the wrong module of the same shape (fix it in "
              "names=), or an operation that differs (padding: PyTorch's explicit padding is not Flax's 'SAME'; "
              "pooling, strides, epsilon, an activation).")
    elif activations:
        message.append("Every mapped module agrees, so what differs comes after the last one (pooling, a reshape, "
                       "the head) or outside the mapped modules.")
    else:
        message.append("Pass activations=normzoo.deploy.torch_activations(net, x) to find the first module off.")
    raise ValueError("port_torch: " + " ".join(message) + "\n" + str(port))


def torch_activations(module, *inputs, eval_mode: bool = True) -> dict[str, np.ndarray]:
    """PyTorch's output of every module that holds parameters or buffers, and of the whole
    model (key ``''``), on ``inputs``, as NumPy arrays keyed by the module's name in the state
    dict (``'layer1.0.bn1'``): what :func:`port_torch` compares per layer. Each module's first
    call is kept. Runs under ``torch.no_grad()``, in eval mode unless ``eval_mode=False`` (the
    module's mode is restored). Needs torch (``pip install 'normzoo[torch]'``)."""
    try:
        import torch
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("torch_activations needs torch: pip install 'normzoo[torch]' (a CPU build of "
                                  "torch is enough).") from e
    acts: dict[str, np.ndarray] = {}
    handles = []

    def keep(name):
        def hook(_, __, output):
            if name not in acts and isinstance(output, torch.Tensor):
                acts[name] = output.detach().cpu().numpy().copy()  # a copy: in-place ops (ReLU) follow
        return hook

    from torch.nn.utils import parametrize

    for name, sub in module.named_modules():
        if not name or ".parametrizations" in f".{name}":  # the model itself is '' below; a parametrization's
            continue                                         # tensors belong to the module it parametrizes
        owns = any(True for _ in sub.parameters(recurse=False)) or any(True for _ in sub.buffers(recurse=False))
        if owns or parametrize.is_parametrized(sub):
            handles.append(sub.register_forward_hook(keep(name)))
    was_training = module.training
    module.train(not eval_mode)
    try:
        with torch.no_grad():
            out = module(*inputs)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    if isinstance(out, torch.Tensor):
        acts[""] = out.detach().cpu().numpy().copy()
    return acts
