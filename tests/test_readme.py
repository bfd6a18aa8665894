"""Every Python snippet in the README runs, in order, in one namespace (8 simulated devices); the
helpers here run the documentation pages' too (tests/test_docs.py, test_port.py, test_sbx_real.py)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(path=README):
    """The ```python blocks of a Markdown file, in order."""
    return re.findall(r"```python\n(.*?)```", Path(path).read_text(), flags=re.S)


def optional_package(code):
    """The optional package a snippet imports (`sbx`: the `rl` extra, run by tests/test_sbx_real.py;
    `torch`: the `torch` extra, run by tests/test_port.py, where they are installed), or None."""
    found = re.search(r"^\s*(?:from|import)\s+(sbx|torch)\b", code, flags=re.M)
    return found and found.group(1)


def run_blocks(blocks, source):
    """Runs code blocks in order in one namespace, which it returns; a failure names the block."""
    namespace = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{source} python block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message names the failing block
            raise AssertionError(f"{source} python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    return namespace


def test_readme_snippets_run():
    blocks = python_blocks()
    assert len(blocks) == 2 and not any(optional_package(b) for b in blocks)
    namespace = run_blocks(blocks, "README.md")
    jnp = namespace["jnp"]
    # The front page's claims: the linen model trained on x + 1e4 and its statistics exact.
    stats = namespace["updates"]["batch_stats"]["BatchNorm_0"]
    assert stats["mean"].shape == (64,) and bool(jnp.isfinite(stats["var"]).all())
    y, running = namespace["y"], namespace["stats"]
    x = namespace["x"]
    assert y.shape == (32, 20) and abs(float(y.mean())) < 1e-3 and abs(float(y.std()) - 1) < 1e-2
    assert jnp.allclose(running.mean, 0.01 * x.mean(0), rtol=1e-6)  # flax's momentum 0.99 from zeros


def test_readme_test_command_is_what_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in text and "<!-- test-command -->" in ci
    block = text.split("<!-- test-command -->", 1)[1]
    command = re.search(r"```bash\n(.*?)```", block, flags=re.S).group(1).strip()
    assert command.endswith("pytest") and "pip install -e '.[dev]'" in command
