"""The base of every model that crosses the wire or a plugin boundary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Immutable; unknown fields are ignored because a peer may be a minor version newer."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", use_attribute_docstrings=True, allow_inf_nan=False
    )
