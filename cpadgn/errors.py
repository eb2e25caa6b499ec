"""User-facing errors: one line that says what is wrong and what to do."""


class CpadgnError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 1."""
