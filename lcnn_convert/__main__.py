"""``python -m lcnn_convert`` and the ``lcnn-convert`` console script.

Kept apart from ``cli`` so that a Ctrl-C while the command line's own modules are still being
imported ends in one line too, not a traceback.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) before anything was written", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
