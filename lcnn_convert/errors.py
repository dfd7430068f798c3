"""The exception types that the CLI turns into a one-line message."""

from __future__ import annotations

import signal


class LcnnError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits non-zero; anything else that escapes is a bug.
    """

    exit_code = 1


class InvalidSetting(LcnnError):
    """A config object's field out of its range, in the library's own words ("lr must be > 0").

    ``setting`` is the field's name, so that a front end can say it in its own terms
    (``named("--lr")``: the CLI's option for that field).
    """

    def __init__(self, setting: str, requirement: str, value: object) -> None:
        self.setting, self.requirement, self.value = setting, requirement, value
        super().__init__(self.named(setting))

    def named(self, name: str) -> str:
        return f"{name} {self.requirement}, got {self.value}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that a terminated run cleans up like an interrupted one."""


class Interrupted(LcnnError):
    """The run was stopped by Ctrl-C or SIGTERM; the message says what was kept."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number

    @classmethod
    def from_signal(cls, stopped: KeyboardInterrupt, message: str) -> Interrupted:
        return cls(message, signal.SIGTERM if isinstance(stopped, Terminated) else signal.SIGINT)

    @staticmethod
    def signal_name(stopped: KeyboardInterrupt) -> str:
        return "terminated (SIGTERM)" if isinstance(stopped, Terminated) else "interrupted (Ctrl-C)"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for one-line user errors."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
