"""The one exception type for a user's mistake: its message is a single actionable line."""


class PtjaxError(Exception):
    """Bad input (a path, a key, a value): the CLI prints the message alone and exits 2."""
