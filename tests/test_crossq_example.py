"""The CrossQ-style drifting-regression example on a few steps (the measured table is in its README)."""

import json

import numpy as np
import pytest

from examples.crossq import main as crossq

TINY = dict(steps=40, batch=16, dim=4, drift=0.05, warmup_steps=20, eval_every=10, progress=False)


def test_eval_and_train_mode_agree_exactly_where_the_layer_says_they_should():
    none = crossq.run_one("none", **TINY)["history"]
    assert none["eval_mse"] == none["train_mode_mse"] and len(none["step"]) == 4  # nothing to differ
    batch = crossq.run_one("batch", **TINY, momentum=0.5)["history"]
    assert all(not np.isclose(e, t, rtol=2e-2) for e, t in zip(batch["eval_mse"], batch["train_mode_mse"]))
    # BatchRenorm: BatchNorm before its switch at step 20; after it, training normalizes as eval
    # does where r and d stay inside their bounds (running averages that keep up: momentum 0.5),
    # up to sbx's placement of epsilon (O(epsilon) = 1e-3 relative), so the two modes agree.
    renorm = crossq.run_one("batch_renorm", **TINY, momentum=0.5)["history"]
    before, after = slice(0, 1), slice(2, None)  # measured after steps 10, 20 (switch), 30, 40
    assert not np.isclose(renorm["eval_mse"][before], renorm["train_mode_mse"][before], rtol=1e-3).any()
    np.testing.assert_allclose(renorm["eval_mse"][after], renorm["train_mode_mse"][after], rtol=5e-3)


@pytest.mark.slow  # the training itself is checked by the default test above
def test_main_writes_the_table_and_the_plot(tmp_path):
    crossq.main(["--steps=20", "--batch=8", "--eval-every=10", "--warmup-steps=10", "--seeds=0",
                 "--norms=none,batch_renorm", f"--out={tmp_path}", "--no-progress"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["seeds"] == [0] and set(saved["runs"]) == {"none", "batch_renorm"}
    md = (tmp_path / "results.md").read_text()
    assert "| none |" in md and "| batch_renorm |" in md and (tmp_path / "drift.png").stat().st_size > 0


def test_unknown_norm_is_named():
    with pytest.raises(ValueError, match=r"norm='group' is not one of \('none', 'batch', 'batch_renorm'\)"):
        crossq.make_norm("group", 10)
