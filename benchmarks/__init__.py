

def save(result: dict, out, tag: str, to_markdown) -> str:
    """Writes ``out/tag.json`` and ``out/tag.md`` (the folder created if needed); returns the Markdown."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"{tag}.md").write_text(md)
    return md


def steady_allocator() -> bool:
    """Fixes glibc malloc's thresholds so that every timed call reuses heap memory.

    By default glibc serves large blocks (JAX's CPU buffers) with ``mmap`` below a threshold
    that it moves as blocks are freed, and returns freed heap to the system. Which buffers
    land on fresh, page-faulting memory then depends on what else the process ran: in a
    round-robin race of several compiled steps the same program measured up to 1.07x slower
    than in a process of its own (``benchmarks/README.md``). Fixed thresholds remove that for
    every variant alike. Returns False where the C library has no ``mallopt`` (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 1 << 30
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))
