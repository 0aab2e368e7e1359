"""The one exception type users see: its message is printed as a one-line error by the CLI."""


class PruneError(Exception):
    """A problem with the user's input or options, explained in one line."""
