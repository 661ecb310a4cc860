"""The one exception type for bad user input."""


class EvomergeError(Exception):
    """A problem the user can fix. The message is one line that names the
    problem and the fix; the CLI prints it and exits with code 2."""


def field_error(where: str, error, tagged: dict[str, str] | None = None) -> EvomergeError:
    """A pydantic ``ValidationError`` as one line: ``WHERE: field.path: message; fix that field``.

    ``tagged`` maps each field that holds a tagged union (``driver``) to its
    tag's key (``name``): the tag pydantic puts in the path after the field
    is left out, as the user wrote no such key, and an error at the field
    itself (no member has that tag) names the tag's key. A validator that
    judges a field from the whole section names it in its error's context as
    ``at_field``.
    """
    tagged = tagged or {}
    first = error.errors()[0]
    parts = [str(p) for p in first["loc"]]
    parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] in tagged)]
    field = (first.get("ctx") or {}).get("at_field")
    if parts and parts[-1] in tagged and len(first["loc"]) == len(parts):
        field = field or tagged[parts[-1]]
    if field and (not parts or parts[-1] != field):
        parts.append(field)
    return EvomergeError(f"{where}: {'.'.join(parts)}: {first['msg']}; fix that field")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
