"""The one exception type the CLI turns into a one-line message (no traceback) and exit code 2."""


class InputError(Exception):
    """Bad user input: the message says what is wrong and what to do."""
