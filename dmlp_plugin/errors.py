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


class MissingDependency(UserError):
    """An optional package a chosen component needs is not installed. ``install`` is the command that
    installs it (e.g. ``pip install 'dmlp_plugin[cleanlab]'``); the message names the package and it."""

    def __init__(self, what: str, package: str, install: str):
        self.package = package
        self.install = install
        super().__init__(f"{what} needs the {package} package, which is not installed: {install}")
