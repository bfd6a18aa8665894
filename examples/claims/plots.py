"""The figures of the claims experiments (matplotlib, Agg backend), one PNG per experiment."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(x, y, k=5):
    """A running mean over ``k`` points, with the x values it ends at."""
    y = np.asarray(y, np.float64)
    if y.size < k:
        return np.asarray(x), y
    return np.asarray(x)[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid")


def activations(rec, path):
    plt = _plt()
    runs = rec["runs"]
    acts = list(dict.fromkeys(n.split("/")[0] for n in runs))
    fig, axes = plt.subplots(len(acts), 3, figsize=(15, 3.6 * len(acts)), squeeze=False)
    for row, act in zip(axes, acts):
        for name, r in runs.items():
            if not name.startswith(act + "/"):
                continue
            label = name.split("/")[1]
            row[0].plot(*_smooth(r["steps"], r["train_accuracy"]), label=label)
            key = "dead" if act == "relu" else "saturated"
            row[1].plot(r["measure_steps"], [np.mean(p[key]) for p in r["pre"]], marker="o", label=label)
            row[2].semilogy(np.arange(1, len(r["grad_norm"][0]) + 1), np.median(r["grad_norm"], 0), marker="o",
                            label=label)
        row[0].set(title=f"{act}: training accuracy", xlabel="step")
        row[1].set(title=f"{act}: " + ("dead channels" if act == "relu" else "saturated share |z| > 2"),
                   xlabel="step")
        row[2].set(title=f"{act}: kernel gradient norm per layer (median)", xlabel="layer")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def learning_rates(rec, path):
    plt = _plt()
    s = rec["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = {"no normalizer": ("none", True), "BatchNorm": ("batch", True), "BatchNorm without γ/β": ("batch", False)}
    for label, (norm, affine) in lines.items():
        rows = [v for v in s.values()
                if v["norm"] == norm and v.get("affine", True) == affine and v["init_scale"] == 1.0]
        lrs = [v["learning_rate"] for v in rows]
        steps = [v["steps_to_target"] if v["steps_to_target"] is not None else np.nan for v in rows]
        axes[0].semilogx(lrs, steps, marker="o", label=label)
        axes[1].semilogx(lrs, [v["test_accuracy"] for v in rows], marker="o", label=label)
    axes[0].set(title=f"steps to {rec['target_accuracy']:.0%} training accuracy (missing: never)",
                xlabel="learning rate")
    axes[1].set(title="test accuracy at the end", xlabel="learning rate")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def regularization(rec, path):
    plt = _plt()
    s = rec["summary"]
    names = list(s)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar(x - 0.2, [s[n]["train_accuracy"] for n in names], 0.4, label="train")
    ax.bar(x + 0.2, [s[n]["test_accuracy"] for n in names], 0.4, label="test")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set(title="accuracy on the training subset and the test set", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def deep_linear(rec, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for norm, r in rec["runs"].items():
        label = "BatchNorm" if norm == "batch" else "no normalizer"
        l2, g = np.asarray(r["ics_l2"]), np.asarray(r["grad_norm"])
        axes[0].semilogy(np.arange(len(l2[0])), np.median(l2[1:] / np.maximum(g[1:], 1e-30), 0) + 1e-12,
                         marker=".", label=label)
        axes[1].plot(np.arange(len(l2[0])), np.median(np.asarray(r["ics_cosine"])[1:], 0), marker=".", label=label)
        axes[2].semilogy(r["steps"], r["loss"], label=label)
    axes[0].set(title="ICS ‖G−G′‖/‖G‖ per layer (median over steps)", xlabel="layer")
    axes[1].set(title="cos(G, G′) per layer", xlabel="layer")
    axes[2].set(title="full-batch loss", xlabel="step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def normalizers(rec, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for norm, r in rec["runs"].items():
        steps = r["measure_steps"]
        axes[0].semilogy(steps, [j["largest"][-1] for j in r["jacobian"]], marker="o", label=norm)
        axes[1].plot(steps, [np.median(j["largest"][:-1]) for j in r["jacobian"]], marker="o", label=norm)
        axes[2].plot(*_smooth(r["steps"], r["train_accuracy"]), label=norm)
    axes[0].set(title="whole network: largest singular value of the Jacobian", xlabel="step")
    axes[1].axhline(1.0, color="gray", ls=":")
    axes[1].set(title="blocks: largest singular value (median over blocks)", xlabel="step")
    axes[2].set(title="training accuracy", xlabel="step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def super_resolution(rec, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for norm, r in rec["runs"].items():
        ax.plot(r["eval_steps"], r["psnr"], marker="o", label="BatchNorm in the blocks" if norm == "batch" else "no BatchNorm (EDSR)")
    ax.axhline(rec["bicubic_psnr"], color="gray", ls="--", label="bicubic")
    ax.set(title="x2 super-resolution, test PSNR (dB)", xlabel="step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def invariance(rec, path):
    plt = _plt()
    s = rec["summary"]
    names = list(s)
    i = int(np.argmax(next(iter(s.values()))["factors"]))
    cols = [("weights", "kernel ×a"), ("input", "input ×a"), ("example", "each example ×a^t")]
    m = np.array([[max(s[n][c][i], 1e-8) for c, _ in cols] for n in names])
    fig, ax = plt.subplots(figsize=(6, 0.32 * len(names) + 1.5))
    im = ax.imshow(np.log10(m), cmap="viridis_r", vmin=-6, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [c[1] for c in cols])
    ax.set_yticks(range(len(names)), names)
    for r in range(len(names)):
        for c in range(len(cols)):
            ax.text(c, r, f"{m[r, c]:.0e}", ha="center", va="center", fontsize=7,
                    color="white" if np.log10(m[r, c]) > -2.5 else "black")
    fig.colorbar(im, label="log10 relative output change (a = largest factor)")
    ax.set(title="which re-scalings each normalizer undoes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_all(results: dict, workdir) -> list[Path]:
    out = []
    for name, rec in results["experiments"].items():
        path = Path(workdir) / f"{name}.png"
        globals()[name](rec, path)
        out.append(path)
    return out
