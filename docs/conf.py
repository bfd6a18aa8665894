"""Sphinx configuration of normzoo's documentation.

    pip install -e '.[docs]' && sphinx-build -W --keep-going docs docs/_build/html

Sphinx because normzoo's docstrings are reStructuredText with Google-style sections (as flax's and
optax's): autodoc + napoleon render them as written, ``.. math::`` included; the pages are
Markdown (MyST). The pages (getting started, the layers, the guides, versions) are written here
in docs/; the examples' results, the benchmarks and the changelog are the repository's own Markdown
files (examples/*/README.md, benchmarks/README.md, CHANGELOG.md), copied into ``docs/_gen`` at every
build with their links rewritten to the site's pages, so the site and the repository cannot
disagree. Every Python block of the pages runs in tests/test_docs.py, the README's in
tests/test_readme.py.
"""

import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import normzoo  # noqa: E402

# page -> (source file, first heading kept, heading it stops before; None: to the end[, a title
# above it]), in order: the repository's Markdown files the site shows.
PAGES = {
    "benchmarks": ("benchmarks/README.md", None, None),
    "examples/cifar": ("examples/cifar/README.md", None, None),
    "examples/crossq": ("examples/crossq/README.md", None, None),
    "examples/santurkar": ("examples/santurkar/README.md", None, None),
    "examples/claims": ("examples/claims/README.md", None, None),
    "examples/porting": ("examples/porting/README.md", None, None),
    "changelog": ("CHANGELOG.md", None, None),
}
GEN = DOCS / "_gen"


def _slug(heading: str) -> str:
    """GitHub's (and MyST's) anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def _headings(lines: list[str]) -> list[int]:
    """Indices of the Markdown headings (not of `#` comments inside fenced code)."""
    found, fenced = [], False
    for k, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            found.append(k)
    return found


def _slice(source: str, start: str | None, stop: str | None, title: str | None = None) -> str:
    lines = (ROOT / source).read_text().splitlines()
    i = lines.index(start) if start else 0
    j = lines.index(stop) if stop else len(lines)
    body = lines[i:j]
    heads = _headings(body)
    top = min((len(body[k].split(" ")[0]) for k in heads), default=1) - (1 if title else 0)
    for k in heads:  # the first heading becomes the page's title (H1); the rest keep their depth below it
        level = len(body[k].split(" ")[0])
        body[k] = "#" * (level - top + 1) + body[k][level:]
    return "\n".join(([f"# {title}", ""] if title else []) + body)


def _generate() -> None:
    shutil.rmtree(GEN, ignore_errors=True)  # nothing left over from an older set of pages
    anchors = {}  # (source, anchor) -> page
    for page, (source, start, stop, *title) in PAGES.items():
        lines = _slice(source, start, stop, *title).splitlines()
        for k in _headings(lines):
            anchors[(source, _slug(lines[k]))] = page
    file_pages = {source: page for page, (source, start, *_) in PAGES.items() if start is None}

    def rewrite(page: str, source: str, text: str) -> str:
        here = Path(page).parent
        src_dir = Path(source).parent

        def link(m: re.Match) -> str:
            bang, label, target = m.group(1), m.group(2), m.group(3)
            if re.match(r"[a-z]+://", target):
                return m.group(0)
            path, _, anchor = target.partition("#")
            if bang:  # an image: point at the repository's file (from docs/_gen/<here>/)
                rel = Path("..", "..", *[".."] * len(here.parts), src_dir, path)
                return f"![{label}]({rel.as_posix()})"
            if not path:  # an anchor in the same source file
                to = anchors.get((source, anchor))
                if to is None:
                    return label
                return f"[{label}]({Path(to).relative_to(here) if to.startswith(str(here)) and str(here) != '.' else _relpath(to, here)}.md#{anchor})"
            resolved = (src_dir / path).as_posix()
            resolved = str(Path(resolved)).replace("\\\\", "/")
            if resolved in file_pages:
                to = file_pages[resolved]
                return f"[{label}]({_relpath(to, here)}.md{'#' + anchor if anchor else ''})"
            return f"{label} (`{resolved}`)" if label != resolved else f"`{resolved}`"

        return re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", link, text)

    for page, (source, start, stop, *title) in PAGES.items():
        out = GEN / f"{page}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rewrite(page, source, _slice(source, start, stop, *title)) + "\n")


def _relpath(to: str, here: Path) -> str:
    return Path(*[".."] * len(here.parts), to).as_posix() if here.parts else to


_generate()

project = "normzoo"
author = "the normzoo developers"
release = normzoo.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from the site itself: formulas render without internet
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 4

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" lists the dataclass fields, several to a line as "Args:" allows ("a, b: as flax's"):
# render it as a parameter list, not as objects of their own.
napoleon_custom_sections = [("Attributes", "params_style")]

html_theme = "furo"
html_title = f"normzoo {release}"
