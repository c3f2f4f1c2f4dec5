"""Errors a user can cause and fix: one line on stderr and exit code 2 at the command-line edge."""

from __future__ import annotations

import sys

EXIT_USAGE = 2


class UserError(Exception):
    """A mistake the user can fix (bad config, missing weights, malformed file): one line, exit 2."""


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


def fail(message: str) -> None:
    """Print `rlfuse: error: <message>` on stderr and exit with code 2: the edge of every command."""
    print(f"rlfuse: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
