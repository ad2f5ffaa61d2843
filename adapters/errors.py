"""The one exception type for user errors.

A ``UserError`` is something the user can fix (unknown concept, missing weights offline, bad artifact, wrong base
model, unwritable output). Entry points catch it, print its one-line message and exit with status 2. Everything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A user-fixable error; its message is one line that says what to do."""

    exit_code = 2
