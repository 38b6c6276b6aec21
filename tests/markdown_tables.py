"""The tables of a Markdown document as a renderer sees them (markdown-it-py, GFM tables)."""

from __future__ import annotations

from markdown_it import MarkdownIt


def _tokens(text: str):
    return MarkdownIt("commonmark").enable("table").parse(text)


def tables(text: str) -> list[list[list[str]]]:
    """Every table of `text`: its rows (the header first), each a list of cell texts."""
    found: list[list[list[str]]] = []
    row: list[str] | None = None
    for token in _tokens(text):
        if token.type == "table_open":
            found.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and row is not None:
            found[-1].append(row)
            row = None
        elif token.type == "inline" and row is not None:
            row.append(token.content)
    return found


def rows_outside_tables(text: str) -> list[str]:
    """Lines written as table rows (`| ... |`) that do not render inside a table."""
    inside: set[int] = set()
    for token in _tokens(text):
        if token.type == "table_open" and token.map:
            inside.update(range(*token.map))
    return [
        line
        for number, line in enumerate(text.splitlines())
        if line.lstrip().startswith("|") and number not in inside
    ]


def inline_html(text: str) -> list[str]:
    """Inline HTML a renderer would find (a `<secret>` in a cell would vanish from the page)."""
    return [
        child.content
        for token in _tokens(text)
        for child in token.children or []
        if child.type == "html_inline"
    ]
