"""Errors that mean "the user's input is wrong": the CLI prints them without a traceback and exits 2."""

from __future__ import annotations


class RkdError(Exception):
    """Base of all errors rkd reports to users as a plain message (exit code 2)."""

    exit_code = 2


class SpecError(RkdError):
    """A spec or search-space entry is wrong.

    ``path`` is the dotted path of the entry inside its YAML document
    (``teacher.model.backbone.width``); ``file`` and ``line`` locate it when known.
    Layers that validate a sub-document raise with a path relative to it;
    :meth:`within` prefixes the parent's path on the way up.
    """

    def __init__(self, path: str, message: str, file: str | None = None, line: int | None = None) -> None:
        self.path, self.message, self.file, self.line = path, message, file, line
        super().__init__(str(self))

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None, int | None]]:
        # pickled across processes (a Ray worker's error reaches the driver): rebuild from the fields
        return type(self), (self.path, self.message, self.file, self.line)

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"

    def within(self, parent: str) -> SpecError:
        path = f"{parent}.{self.path}" if self.path else parent
        return SpecError(path, self.message, self.file, self.line)


class DataError(RkdError):
    """A data file is missing or does not parse; the message names the file (and line)."""


class TeacherError(RkdError):
    """The teacher is unusable for distillation (e.g. its mAP is below ``teacher.min_map``)."""
