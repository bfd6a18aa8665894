"""Every Python snippet in the README runs, in order, in one namespace (8 simulated devices)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


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
    blocks = [b for b in python_blocks() if not optional_package(b)]
    assert len(blocks) >= 4
    namespace = run_blocks(blocks, "README.md")
    assert namespace["y"].shape[0] == namespace["jax"].local_device_count()
    assert "mean" in namespace["updates"]["batch_stats"]


def test_readme_test_command_is_what_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in text and "<!-- test-command -->" in ci
    block = text.split("<!-- test-command -->", 1)[1]
    command = re.search(r"```bash\n(.*?)```", block, flags=re.S).group(1).strip()
    assert command.endswith("pytest") and "pip install -e '.[dev]'" in command
