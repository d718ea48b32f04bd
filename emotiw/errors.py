"""Expected failures: the CLI prints the message on one line and exits non-zero, with no traceback."""


class UserError(Exception):
    """Bad input or a missing piece. The message says what went wrong and how to fix it."""
