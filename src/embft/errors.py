"""The one exception type for user mistakes: its message says what is wrong and what to do."""


class EmbftError(Exception):
    """Bad input or environment; printed as one line (a traceback only with debug=true)."""
