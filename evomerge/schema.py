"""The base of every schema a user writes: recipes, search configs, space files."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A frozen model that refuses unknown keys: a typo in a user's YAML is an
    error that names the field, never a silently ignored setting."""

    model_config = ConfigDict(frozen=True, extra="forbid")
