"""The one exception type the command line turns into a one-line message (exit status 2)."""


class UserError(ValueError):
    """Bad input from the user: a file, a key, a value. The message names it and what is allowed."""
