"""The one exception type that reaches a user as a one-line message (exit code 2).

Raise :class:`UserError` at a public boundary (config, CLI, file loaders) when the input is wrong and the
user can fix it; the message names the bad value and what would be right. Everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix. ``str(err)`` is a single line naming the bad value and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
