"""The Markdown tables of the claims experiments (``results.md``), one per experiment."""

from __future__ import annotations

import numpy as np


def _f(v, fmt="{:.3g}") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not np.isfinite(v):
        return "nan"
    return fmt.format(v)


def _acc(v) -> str:
    return _f(v, "{:.4f}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" + " ---: |" * (len(header) - 1)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def activations(rec) -> list[str]:
    rows = [[name, _acc(s["test_accuracy"]), _f(s["final_train_loss"]),
             f"{_f(s['saturated_init'], '{:.3f}')} → {_f(s['saturated_end'], '{:.3f}')}",
             f"{_f(s['linear_init'], '{:.3f}')} → {_f(s['linear_end'], '{:.3f}')}",
             f"{_f(s['dead_init'], '{:.3f}')} → {_f(s['dead_end'], '{:.3f}')}" if name.startswith("relu") else "—",
             f"{_f(s['first_last_grad_ratio_init'])}, {_f(s['first_last_grad_ratio'])}", _f(s["ics_cosine"])]
            for name, s in rec["summary"].items()]
    return _table(["activation/normalizer", "test acc.", "train loss", "saturated |z|>2 (init → end)",
                   "near-linear |z|<1 (init → end)", "dead ReLU channels (init → end)",
                   "‖∇W₁‖/‖∇W_L‖ (init, median)", "ICS cos(G, G′)"], rows)


def learning_rates(rec) -> list[str]:
    rows = [[name, _f(s["steps_to_target"], "{:d}") if s["steps_to_target"] is not None else "never",
             _acc(s["test_accuracy"]), _f(s["final_train_loss"]),
             "—" if s["diverged_at"] is None else str(s["diverged_at"]),
             _f(s.get("dead_end"), "{:.2f}") if s["diverged_at"] is None else "—"]
            for name, s in rec["summary"].items()]
    return _table(["normalizer@lr (init scale)", f"steps to {rec['target_accuracy']:.0%} train acc.", "test acc.",
                   "train loss", "diverged at", "dead ReLU channels at the end (most in a layer)"], rows)


def regularization(rec) -> list[str]:
    rows = [[name, _acc(s["train_accuracy"]), _acc(s["test_accuracy"]), _f(s["gap"], "{:.4f}")]
            for name, s in rec["summary"].items()]
    return _table(["normalizer/regularizer", "train acc.", "test acc.", "gap"], rows)


def deep_linear(rec) -> list[str]:
    rows = [[name, _f(s["ics_l2"]), _f(s["ics_relative"]), _f(s["ics_cosine"], "{:.5f}"),
             f"{_f(s['initial_loss'])} → {_f(s['final_loss'])}"] for name, s in rec["summary"].items()]
    return _table(["normalizer", "ICS ‖G−G′‖ (median)", "‖G−G′‖/‖G‖ (median)", "cos(G, G′) (median)", "loss"], rows)


def normalizers(rec) -> list[str]:
    rows = [[name, _acc(s["test_accuracy"]), _f(s["steps_to_target"], "{:d}") if s["steps_to_target"] else "never",
             f"{_f(s['block_median_init'])} → {_f(s['block_median_end'])}",
             f"{_f(s['block_largest_init'])} → {_f(s['block_largest_end'])}",
             f"{_f(s['net_largest_init'])} → {_f(s['net_largest_end'])}",
             f"{_f(s['net_condition_init'])} → {_f(s['net_condition_end'])}"] for name, s in rec["summary"].items()]
    return _table(["normalizer", "test acc.", f"steps to {rec['target_accuracy']:.0%}", "block σ median (init → end)",
                   "block σ max", "network σ max", "network σ max/σ min"], rows)


def super_resolution(rec) -> list[str]:
    rows = [[name, _f(s["psnr"], "{:.2f}"), _f(s["psnr_gain_over_bicubic"], "{:+.2f}"),
             _f(s["psnr_batch_statistics"], "{:.2f}")] for name, s in rec["summary"].items()]
    rows.append(["bicubic", _f(rec["bicubic_psnr"], "{:.2f}"), "0", "—"])
    return _table(["residual blocks", "test PSNR (dB)", "over bicubic", "PSNR with batch statistics"], rows)


def invariance(rec) -> list[str]:
    first = next(iter(rec["summary"].values()))
    a = first["factors"]
    i = int(np.argmax(a))
    rows = [[name, _f(s["weights"][i], "{:.1e}"), _f(s["grad_ratio"][i], "{:.3f}"), _f(s["input"][i], "{:.1e}"),
             _f(s["example"][i], "{:.1e}")] for name, s in rec["summary"].items()]
    return _table(["registry name", f"kernel ×{a[i]:g}: output change", "gradient-norm ratio",
                   f"input ×{a[i]:g}: output change", f"each example ×{a[i]:g}^t, t∈[−1,1]"], rows)


def to_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"Preset `{meta['preset']}`, seed {meta['config'].get('seed', 0)}; {meta['hardware']}; jax {meta['jax']}.", ""]
    for name, rec in results["experiments"].items():
        lines += [f"### {name} ({rec.get('wall_s', 0) / 60:.1f} min)", ""] + globals()[name](rec) + [""]
    return "\n".join(lines)
