"""The one exception type that the CLI turns into a one-line message."""


class LcnnError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits non-zero; anything else that escapes is a bug.
    """
