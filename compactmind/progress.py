"""What long steps report as they go (a library callback object; the CLI draws it on a terminal or logs it). The
library never prints: these no-ops are its default."""

from __future__ import annotations


class Progress:
    """What long steps report as they go; the CLI draws it (a terminal) or logs it (elsewhere). These no-ops are
    the library's default: it never prints."""

    def level_built(self, done: int, total: int, label: str, how: str) -> None:
        """A dynamic study's level database: one level read or built."""

    def block(self, step: str, done: int, total: int) -> None:
        """A calibrated method's layer-by-layer loop: `done` of `total` blocks compressed."""

    def window(self, done: int, total: int) -> None:
        """An evaluation: `done` of `total` windows scored."""

    def trial_done(self, record: dict) -> None:
        """A trial finished (its attributes, and `number`)."""


SILENT = Progress()
