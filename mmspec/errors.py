"""The library's one bad-input exception family.

Everything mmspec raises because of what a user passed (an argument, a file, a checkpoint) is a `UserError`, and only
that is what the CLI turns into one line on stderr with exit status 2; any other exception is a bug and keeps its
traceback. The subclasses also derive from the builtin a caller would expect (ValueError, TypeError,
FileNotFoundError), so `except ValueError` around a library call keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and what would be right."""


class InputError(UserError, ValueError):
    """A value that is out of range, malformed or inconsistent."""


class InputTypeError(UserError, TypeError):
    """An argument of the wrong type."""


class MissingInputError(UserError, FileNotFoundError):
    """A file, directory or model that is not there (mmspec never downloads)."""
