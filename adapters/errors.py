"""The one exception type for user errors.

A ``UserError`` is something the user can fix (unknown concept, missing weights offline, bad artifact, wrong base
model, unwritable output). Entry points catch it, print its one-line message and exit with status 2. Everything
else is a bug and keeps its traceback.

The toy world, below every other layer, raises built-in exceptions (``FileNotFoundError`` for missing weights,
``erasure.toyworld.NotAToyConcept``, a ``ValueError``); a caller that passes user input to it wraps the call in
:func:`user_errors` to turn them into ``UserError`` with the same message.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """A user-fixable error; its message is one line that says what to do."""

    exit_code = 2


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Re-raise any of ``kinds`` raised inside the block as a :class:`UserError` with the same message."""
    try:
        yield
    except kinds as e:
        raise UserError(str(e)) from e
