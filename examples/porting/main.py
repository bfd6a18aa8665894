"""Port torchvision's ResNet-18, MobileNet-V2 and ConvNeXt-Tiny into Flax with one call each, checked.

    pip install -e '.[torch]'                  # torch and torchvision (CPU builds are enough)
    python -m examples.porting.main            # writes examples/porting/results/zoo.{md,json}

For each model: torchvision's architecture with random weights and randomized BatchNorm
statistics (no download; a non-trivial check), its Flax twin from ``models.py``, and
``normzoo.deploy.port_torch`` with PyTorch's per-module activations on one sample. Measured: the
number of modules mapped automatically, the relative error of the Flax outputs against
PyTorch's in eval mode and in training mode (batch statistics), the worst module's error, the
BatchNorms that ``deploy.fold`` folds, whether the export loads back into torchvision with
``strict=True`` bit for bit, and the two traps on ResNet-18 (same-shape BatchNorms swapped in a
mapping; Flax's ``'SAME'`` padding where PyTorch pads explicitly): which module the check names.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from examples.porting import models
from examples.porting.torch_models import torchvision_models
from normzoo import deploy

RESULTS = Path(__file__).resolve().parent / "results"
ZOO = {
    "resnet18": (lambda tv: tv.resnet18(num_classes=1000), lambda: models.ResNet18(1000), {"train": False}),
    "mobilenet_v2": (lambda tv: tv.mobilenet_v2(num_classes=1000), lambda: models.MobileNetV2(1000), {"train": False}),
    "convnext_tiny": (lambda tv: tv.convnext_tiny(num_classes=1000), lambda: models.ConvNeXtTiny(1000), {}),
}


def randomize(torch, net, seed: int = 0):
    """Random BatchNorm statistics and affine parameters, and ConvNeXt's layer scale at order 1
    (torchvision initializes it at 1e-6, which would hide the blocks from the check)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.num_batches_tracked.fill_(1000)
        for name, p in net.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return net.eval()


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def port_one(name: str, size: int, batch: int, seed: int = 0) -> dict:
    import torch

    tv = torchvision_models()
    make_net, make_model, kw = ZOO[name]
    torch.manual_seed(seed)
    net, model = randomize(torch, make_net(tv), seed), make_model()
    x = np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    acts = deploy.torch_activations(net, _nchw(torch, x))
    start = time.perf_counter()
    port = deploy.port_torch(model, state, x, activations=acts, **kw)
    seconds = time.perf_counter() - start
    row = {"model": name, "modules": len(port.names), "state_dict_entries": len(state),
           "eval_error": port.output_error, "worst_module_error": max(port.layer_errors.values()),
           "worst_module": max(port.layer_errors, key=port.layer_errors.get), "port_seconds": seconds}
    if kw:  # BatchNorm models: training mode and folding
        net.train()
        for m in net.modules():  # MobileNet's classifier dropout: the Flax twin has none (identity at inference)
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        with torch.no_grad():
            want = net(_nchw(torch, x)).numpy()
        got, _ = model.apply(port.variables, x, train=True, mutable=["batch_stats"])
        row["train_error"] = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
        net.eval()
        folded = deploy.fold(model, port.variables, x, train=False)
        row["batch_norms"] = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        row["folded"] = len(folded.folded)
        row["folded_error"] = folded.max_error
    rebuilt = make_net(tv)
    rebuilt.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in port.to_torch().items()},
                            strict=True)
    row["export_bit_identical"] = all(np.array_equal(v.numpy(), state[k]) for k, v in rebuilt.state_dict().items())
    return row


def traps(size: int, batch: int) -> dict:
    """The two silent mistakes on ResNet-18, and the module the check names."""
    import torch

    tv = torchvision_models()
    net = randomize(torch, tv.resnet18(num_classes=1000))
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    acts = deploy.torch_activations(net, _nchw(torch, x))
    names = deploy.port_torch(models.ResNet18(1000), state, x, train=False, activations=acts).names
    swapped = {**names, "layer2.0.bn2": names["layer2.0.downsample.1"], "layer2.0.downsample.1": names["layer2.0.bn2"]}
    out = {}
    original = models._pad
    for trap, kw in (("swapped_batch_norms", {"names": swapped}), ("same_padding", {})):
        if trap == "same_padding":
            models._pad = lambda k: "SAME"
        try:
            deploy.port_torch(models.ResNet18(1000), state, x, train=False, activations=acts, **kw)
            out[trap] = {"caught": False}
        except ValueError as e:
            line = str(e).splitlines()[0]
            first = line.split("The first module off, in call order: ")[1].split(" (")[0]
            error = float(line.split("differ from PyTorch's by ")[1].split(" ")[0])
            out[trap] = {"caught": True, "output_error": error, "named": first}
        finally:
            models._pad = original
    return out


def to_markdown(rows: list[dict], trap_rows: dict, size: int, batch: int) -> str:
    lines = [f"Sample {batch} x {size} x {size} x 3; errors relative to PyTorch's largest output.", "",
             "| model | modules mapped | eval error | training error | worst module | folded BNs | export "
             "`strict=True`, bit-identical |", "| --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        train = f"{r['train_error']:.1e}" if "train_error" in r else "(no BatchNorm)"
        folded = f"{r['folded']} / {r['batch_norms']}" if "folded" in r else "-"
        lines.append(f"| {r['model']} | {r['modules']} | {r['eval_error']:.1e} | {train} | "
                     f"`{r['worst_module']}` {r['worst_module_error']:.1e} | {folded} | "
                     f"{'yes' if r['export_bit_identical'] else 'no'} |")
    lines += ["", "| trap on ResNet-18 | outputs off by | the check names |", "| --- | ---: | --- |"]
    for trap, t in trap_rows.items():
        lines.append(f"| {trap.replace('_', ' ')} | {t.get('output_error', 0):.2g} | {t.get('named', 'not caught')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [port_one(name, args.size, args.batch) for name in tqdm(args.models, desc="porting")]
    trap_rows = traps(args.size, args.batch) if "resnet18" in args.models else {}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "models": rows, "traps": trap_rows}
    (args.out / "zoo.json").write_text(json.dumps(results, indent=1))
    (args.out / "zoo.md").write_text(to_markdown(rows, trap_rows, args.size, args.batch))
    print(to_markdown(rows, trap_rows, args.size, args.batch))
    return results


if __name__ == "__main__":
    main()
