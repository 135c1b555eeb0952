"""YAML loading that remembers where each entry was written, so errors can say ``file:line``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rkd.errors import SpecError


class SourceMap:
    """Line numbers of the entries of one YAML document, keyed by dotted path.

    >>> doc, where = load_yaml_text("a:\\n  b: 1\\n  c: [1, 2]\\n", "x.yaml")
    >>> where.line("a.c"), where.line("a.c.zz"), where.locate(SpecError("a.b", "bad"))
    (3, 3, 'x.yaml:2: a.b: bad')
    """

    def __init__(self, file: str, lines: dict[str, int]) -> None:
        self.file, self._lines = file, lines

    def line(self, path: str) -> int | None:
        """Line of ``path``, or of its nearest ancestor that was written down."""
        while True:
            if path in self._lines:
                return self._lines[path]
            if "." not in path:
                return self._lines.get("")
            path = path.rsplit(".", 1)[0]

    def locate(self, err: SpecError) -> str:
        return str(SpecError(err.path, err.message, self.file, self.line(err.path)))

    def error(self, err: SpecError) -> SpecError:
        """``err`` with this document's file and the entry's line filled in."""
        return SpecError(err.path, err.message, self.file, self.line(err.path))


def _walk(node: yaml.Node, path: str, lines: dict[str, int], file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if child in lines:  # YAML keeps the last of two equal keys without a word
                raise SpecError(child, f"given twice (also on line {lines[child]})", file, key_node.start_mark.line + 1)
            lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}.{i}" if path else str(i)
            lines[child] = item.start_mark.line + 1
            _walk(item, child, lines, file)


def load_yaml_text(text: str, file: str) -> tuple[Any, SourceMap]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError("", f"invalid YAML: {problem}", file, mark.line + 1 if mark else None) from None
    lines: dict[str, int] = {"": 1}
    if node is not None:
        _walk(node, "", lines, file)
    return data, SourceMap(file, lines)


def load_yaml(path: str | Path) -> tuple[Any, SourceMap]:
    """Parse ``path``; a missing file or bad YAML raises :class:`SpecError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("", "file not found", str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SpecError(
            "", f"not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); save it as UTF-8", str(path), line
        ) from None
    return load_yaml_text(text, str(path))
