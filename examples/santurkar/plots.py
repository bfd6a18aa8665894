"""The figures of the reproduction, one PNG per claim of the paper (matplotlib, Agg backend).

* ``accuracy.png`` (paper Fig. 1): train and test accuracy, standard vs BatchNorm at each learning rate;
* ``noisy.png`` (Fig. 2): standard vs BatchNorm vs noisy BatchNorm, accuracy and the percentiles of
  one layer's pre-activations through training;
* ``ics.png`` (Fig. 3): ‖G − G′‖ and cos(G, G′) per layer through training, standard vs BatchNorm;
* ``landscape.png`` (Fig. 4): the loss range along the gradient, gradient predictiveness and
  effective β-smoothness through training;
* ``lp.png`` (the Lp section): L1 / L2 (BatchNorm) / L∞ normalization vs standard;
* ``zoo.png``: every run's test accuracy, median smoothness, ICS and per-step distribution shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run: str) -> str:
    norm, _, lr = run.partition("@")
    return {"none": "standard", "batch": "BatchNorm"}.get(norm, norm) + f", lr {lr}"


def _pick(runs: dict, *names) -> list[str]:
    return [n for n in names if n in runs]


def _smooth(y, k=5):
    y = np.asarray(y, np.float64)
    if y.size < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def _train_curve(ax, run: dict, label: str) -> None:
    smoothed = _smooth(run["train_accuracy"])
    ax.plot(np.asarray(run["steps"])[len(run["steps"]) - len(smoothed):], smoothed, label=label)


def plot_accuracy(runs: dict, names: list[str], path: Path, title: str) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        r = runs[n]
        _train_curve(a, r, _label(n))
        b.plot(r["eval_steps"], r["test_accuracy"], marker="o", label=_label(n))
    a.set(xlabel="step", ylabel="train accuracy (running mean)", title=title)
    b.set(xlabel="step", ylabel="test accuracy", title="test accuracy (last point: all 10,000)")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_noisy(runs: dict, names: list[str], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.8))
    for n in names:
        _train_curve(axes[0], runs[n], _label(n))
    axes[0].set(xlabel="step", ylabel="train accuracy", title="training")
    axes[0].legend(fontsize=8)
    for ax, n in zip(axes[1:], names):
        r = runs[n]
        layer = len(r["norm_layers"]) // 2  # a middle layer
        p = np.asarray(r["activation_percentiles"])[:, layer, :]  # (measurements, quantiles)
        q = r["quantiles"]
        s = r["measure_steps"]
        for lo, hi, alpha in ((0, -1, 0.15), (1, -2, 0.3), (2, -3, 0.45)):
            ax.fill_between(s, p[:, lo], p[:, hi], alpha=alpha, color="C0", lw=0,
                            label=f"{q[lo]:g}-{q[hi]:g}th pct.")
        ax.plot(s, p[:, len(q) // 2], color="C0", label="median")
        ax.set(xlabel="step", title=f"{_label(n)}: {r['norm_layers'][layer]} output")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ics(runs: dict, names: list[str], path: Path) -> None:
    plt = _plt()
    layers = runs[names[0]]["layers"]
    show = sorted({1, len(layers) // 2, len(layers) - 2})  # (layer 0 has no predecessors: 0 by definition)
    fig, axes = plt.subplots(2, len(show), figsize=(4.2 * len(show), 6.5), squeeze=False)
    for j, li in enumerate(show):
        for n in names:
            r = runs[n]
            axes[0, j].plot(r["measure_steps"], np.asarray(r["ics_l2"])[:, li], marker=".", label=_label(n))
            axes[1, j].plot(r["measure_steps"], np.asarray(r["ics_cosine"])[:, li], marker=".", label=_label(n))
        axes[0, j].set(title=f"layer {li + 1} ({layers[li]})", ylabel="‖G − G′‖₂", yscale="log")
        axes[1, j].set(xlabel="step", ylabel="cos(G, G′)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_landscape(runs: dict, names: list[str], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, n in enumerate(names):
        r = runs[n]
        s = r["measure_steps"]
        loss = np.asarray(r["landscape_loss"])
        dist = np.asarray(r["landscape_grad_distance"])
        axes[0].fill_between(s, np.nanmin(loss, 1), np.nanmax(loss, 1), alpha=0.35, color=f"C{i}", label=_label(n))
        axes[1].fill_between(s, np.nanmin(dist, 1), np.nanmax(dist, 1), alpha=0.35, color=f"C{i}", label=_label(n))
        axes[2].plot(s, r["smoothness"], marker=".", color=f"C{i}", label=_label(n))
    axes[0].set(xlabel="step", ylabel="loss", title="loss along the gradient (range over η)", yscale="log")
    axes[1].set(xlabel="step", ylabel="‖∇L(θ) − ∇L(θ − η∇L)‖", title="gradient predictiveness (range)", yscale="log")
    axes[2].set(xlabel="step", ylabel="max ‖Δ∇‖ / ‖η∇L‖", title="effective β-smoothness", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_zoo(summary: dict, path: Path) -> None:
    plt = _plt()
    names = list(summary)
    keys = [("test_accuracy", "test accuracy", False), ("smoothness", "effective β-smoothness (median)", True),
            ("ics_l2", "ICS ‖G − G′‖ (median, layer mean)", True), ("shift_mean", "|Δ channel mean| per step", True)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.35 * len(names) + 1.8))
    for ax, (k, title, log) in zip(axes, keys):
        v = [summary[n][k] for n in names]
        ax.barh(range(len(names)), v, color=["C1" if summary[n]["norm"] == "none" else "C0" for n in names])
        ax.set(title=title, xscale="log" if log else "linear")
        ax.set_yticks(range(len(names)), [_label(n) for n in names] if ax is axes[0] else [])
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(results: dict, workdir: Path) -> list[Path]:
    """Writes every figure whose runs are present; returns their paths."""
    runs, workdir, out = results["runs"], Path(workdir), []
    lrs = sorted({r.partition("@")[2] for r in runs}, key=float)
    acc = [n for lr in lrs for n in _pick(runs, f"none@{lr}", f"batch@{lr}")]
    if acc:
        out.append(workdir / "accuracy.png")
        plot_accuracy(runs, acc, out[-1], "standard vs BatchNorm")
    noisy = _pick(runs, "none@0.1", "batch@0.1", "noisy_batch@0.1")
    if len(noisy) > 1:
        out.append(workdir / "noisy.png")
        plot_noisy(runs, noisy, out[-1])
    pair = _pick(runs, "none@0.1", "batch@0.1") or list(runs)[:2]
    out.append(workdir / "ics.png")
    plot_ics(runs, pair, out[-1])
    out.append(workdir / "landscape.png")
    plot_landscape(runs, pair + _pick(runs, "batch@0.5"), out[-1])
    lp = _pick(runs, "none@0.1", "l1_batch@0.1", "batch@0.1", "l2_batch@0.1", "linf_batch@0.1")
    if len(lp) > 2:
        out.append(workdir / "lp.png")
        plot_accuracy(runs, lp, out[-1], "Lp normalization")
        out.append(workdir / "lp_landscape.png")
        plot_landscape(runs, lp, out[-1])
    out.append(workdir / "zoo.png")
    plot_zoo(results["summary"], out[-1])
    return out
