"""The one exception type for bad user input."""


class EvomergeError(Exception):
    """A problem the user can fix. The message is one line that names the
    problem and the fix; the CLI prints it and exits with code 2."""


def field_error(where: str, error) -> EvomergeError:
    """A pydantic ``ValidationError`` as one line: ``WHERE: field.path: message; fix that field``."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return EvomergeError(f"{where}: {loc}: {first['msg']}; fix that field")
