"""The one exception type that the CLI turns into a one-line message."""


class LcnnError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits non-zero; anything else that escapes is a bug.
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for one-line user errors."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
