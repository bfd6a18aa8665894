"""The documentation site: every Python block of its pages runs (each page in one namespace; the
blocks that need torch or sbx in test_port.py and test_sbx_real.py), its figure shows what the page
says, and (slow) it builds strictly."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_readme import optional_package, python_blocks, run_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_gen" not in p.parts and "_build" not in p.parts)


def test_the_pages_are_the_site():
    assert {p.relative_to(DOCS).as_posix() for p in PAGES} == {
        "index.md", "getting-started.md", "layers.md", "api.md", "versions.md", "guides/rl.md",
        "guides/differences.md", "guides/multi-device.md", "guides/deployment.md", "guides/analysis.md",
        "guides/development.md",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_every_code_block_of_a_page_runs(page):
    run_blocks([b for b in python_blocks(page) if not optional_package(b)], page.relative_to(DOCS).as_posix())


def test_the_large_mean_figure_shows_flax_fast_variance_failing_and_ours_exact(tmp_path):
    from docs.figures import large_mean

    errors = large_mean.variance_errors(offsets=np.array([1.0, 1e2, 1e4]))
    assert (errors["normzoo BatchNorm"] < 1e-5).all()
    fast = errors["flax BatchNorm (default: fast variance)"]
    assert fast[0] < 1e-5 and fast[1] > 1e-4 and fast[2] > 1.0


@pytest.mark.slow  # a full Sphinx build: API reference, guides, examples' pages
def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None:
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]')")
    out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                          str(tmp_path / "html")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    html = (tmp_path / "html" / "guides" / "deployment.html").read_text()
    assert "port_torch" in html and "_gen/examples/porting.html" in html  # the link to the example's README page
    assert (tmp_path / "html" / "api.html").read_text().count("normzoo.functional.batch_norm") >= 1
