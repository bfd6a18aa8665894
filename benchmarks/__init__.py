

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
