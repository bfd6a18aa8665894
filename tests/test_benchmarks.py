"""The benchmark scripts run end to end on tiny shapes (no timing is asserted)."""

import json
from pathlib import Path

import pytest

from benchmarks import layers, training


LAYER_ROWS = {"BatchNorm (train)", "BatchNorm (eval)", "BatchRenorm (train)", "IBN (train)", "InstanceNorm",
              "GroupNorm (4 groups)", "LayerNorm", "RMSNorm", "WeightNormDense", "CosineDense"}


# Every layer compiles three programs per pass (normzoo, flax's default and stable modes): the
# default run takes one row with a stable baseline and a bandwidth floor (RMSNorm) and one without
# (WeightNormDense), the slow run every row.
@pytest.mark.parametrize("only", ["rmsnorm", "weightnorm", pytest.param(None, marks=pytest.mark.slow)])
def test_layer_benchmark_on_tiny_shapes(only):
    """One tiny activation shape and one dense shape, float32: the rows ``only`` selects, end to end."""
    import jax.numpy as jnp

    result = layers.run(rounds=1, min_time=0.0, shapes={"cifar_late": (4, 2, 2, 8), "dense": (4, 8)},
                        dtypes=(jnp.float32,), only=only)
    rows = result["rows"]
    names = {r["layer"] for r in rows}
    assert names == {n for n in LAYER_ROWS if only is None or only in n.lower()}
    assert {r["dtype"] for r in rows} == {"float32"} and {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["normzoo_ms"] > 0 and r["baseline_ms"] > 0
        assert r["ratio"] == pytest.approx(r["normzoo_ms"] / r["baseline_ms"], rel=1e-9)  # one round: its ratio
        assert ("stable_ratio" in r) == (r["baseline"] in {"nn.BatchNorm", "nn.InstanceNorm", "nn.GroupNorm", "nn.LayerNorm", "nn.RMSNorm"})
        assert ("floor_fraction" in r) == (r["layer"] not in {"WeightNormDense", "CosineDense"})
    md = layers.to_markdown(result)
    assert md.count("\n| ") == len(rows) + 2 and "GB/s" in md  # header, separator, rows
    json.dumps(result)


@pytest.mark.slow
def test_rl_benchmark_actor_critic_step(tmp_path):
    from benchmarks import rl

    rl.main(["--rounds=1", "--batch=4", "--hidden=8", f"--out={tmp_path}", "--default-allocator"])
    rows = json.loads((tmp_path / "rl.json").read_text())["rows"]
    assert [r["step"] for r in rows] == ["critic", "actor-critic", "layer alone, 8x8 fwd+bwd"]
    assert ", glibc default; ms" in (tmp_path / "rl.md").read_text()


_MMAPPED_BYTES_OF_A_16_MIB_BLOCK = """
import ctypes, ctypes.util, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, MallInfo2
if sys.argv[1] == "steady":
    from benchmarks import steady_allocator
    assert steady_allocator()
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="steady_allocator tunes glibc's malloc")
def test_steady_allocator_keeps_large_blocks_off_mmap():
    import subprocess
    import sys

    def mmapped(mode):
        out = subprocess.run([sys.executable, "-c", _MMAPPED_BYTES_OF_A_16_MIB_BLOCK, mode], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])
        return int(out.stdout)

    assert mmapped("default") >= 16 << 20  # mapped bytes added by the block; glibc's default: a fresh mapping, page faults on first touch
    assert mmapped("steady") == 0  # from the heap, which is reused and not trimmed


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--width=4", "--batch=8", "--rounds=1"]])
def test_training_benchmark_runs(tmp_path, argv):
    training.main(argv + [f"--out={tmp_path}"])
    result = json.loads((tmp_path / "training.json").read_text())
    assert [r["norm"] for r in result["per_normalizer"]] == __import__("normzoo").available()
    assert result["synced"]["devices"] == 8 and result["synced"]["synced_step_ms"] > 0
    assert result["input_pipeline"]["data_images_per_s"] > 0
    assert "Synced BatchNorm on 8 simulated CPU devices" in (tmp_path / "training.md").read_text()


@pytest.mark.slow  # ten compilations; the layer benchmark's smoke test runs by default
def test_rl_benchmark_on_a_tiny_critic():
    from benchmarks import rl

    result = rl.run(rounds=1, batch=4, hidden=8, steps=("critic",))  # actor-critic: in the slow run
    assert [r["step"] for r in result["rows"]] == ["critic", "layer alone, 8x8 fwd+bwd"]
    for row in result["rows"]:
        assert set(row) == {"step", *rl.norms()}
        for n in rl.norms():  # one round (the update rows): each ratio is that round's time over the sbx-style layer's
            assert row[n]["ms"] > 0
            if row["step"] == "critic":
                assert row[n]["ratio"] == pytest.approx(row[n]["ms"] / row["sbx-style"]["ms"], rel=1e-9)
    md = rl.to_markdown(result)
    assert md.count("\n| ") == 4 and "256 -> 8 -> 8 -> 1, batch 4" in md
    json.dumps(result)


@pytest.mark.slow
def test_deploy_benchmark_runs(tmp_path):
    from benchmarks import deploy

    deploy.main(["--rounds=1", "--batches=1", "--norms=batch", "--models=resnet20", f"--out={tmp_path}"])
    (row,) = json.loads((tmp_path / "deploy.json").read_text())["rows"]
    assert row["folded_layers"] == 19 and row["statuses"] == ["folded"] and row["max_error"] < 1e-5
    assert row["folded"]["ms"] > 0 and "| resnet20 | batch | 1 |" in (tmp_path / "deploy.md").read_text()
