"""The one exception type users see.

Every check on user input raises :class:`UserError` with a message that says what is
wrong and what to do. The CLI prints it as a single line (no traceback) and exits 2.
"""


class UserError(ValueError):
    """Bad input from the user: a path, a config, a flag, a data file."""
