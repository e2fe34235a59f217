"""A msgspec mirror of :class:`schemas.events.ActivityLogged`, for the accepted path only.

The pydantic models stay the definition of every message (JSON Schema, AsyncAPI, the ``error``
header of a rejected record). This struct only decodes the common case several times faster;
``consumer.stream.decode`` accepts what it decodes only after the checks that make it agree
with the pydantic model, and hands everything else to the model (a differential property test
holds the two to the same answers).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec


# gc=False: the fields are atoms (no reference cycles), so the collector need not track one
# object per event; frozen, like the pydantic model.
class LoggedActivity(msgspec.Struct, frozen=True, gc=False):
    """``activity.logged`` as decoded by the fast path; same field names and values."""

    event_type: Literal["activity.logged"]
    schema_version: int
    event_id: UUID
    activity_id: UUID
    mentor_id: UUID
    organization_id: UUID
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)]
    activity_type: str


LOGGED_DECODER = msgspec.json.Decoder(LoggedActivity)
