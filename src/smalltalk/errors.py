"""One error type for everything a user can get wrong, so the CLI can print it in one clear block."""

from __future__ import annotations


class SmalltalkError(Exception):
    """A user-facing error: what went wrong, where (file:line when it applies) and what to do."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.what, self.where, self.fix = what, where, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.what
        if self.where:
            text += f"\n  where: {self.where}"
        if self.fix:
            text += f"\n  fix:   {self.fix}"
        return text
