"""The one exception type for bad user input."""


class EvomergeError(Exception):
    """A problem the user can fix. The message is one line that names the
    problem and the fix; the CLI prints it and exits with code 2."""
