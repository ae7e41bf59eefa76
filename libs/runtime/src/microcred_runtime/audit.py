"""The audit trail's shape: who changed an aggregate (an enrollment, a credential), when, and how.

Each service builds its trail from what it records anyway (the aggregate's own columns and its
history of changes), so the trail can never disagree with the state it explains.
"""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class AuditEntry(BaseModel):
    """One change, as an audit endpoint lists it (oldest first)."""

    model_config = ConfigDict(frozen=True)

    change: str = Field(description="What happened, past tense.", examples=["completed"])
    at: datetime = Field(description="When it took effect.", examples=["2025-05-02T16:45:00Z"])
    actor: str | None = Field(
        description=(
            "Who did it: `<role>:<token subject>` for a person, `payment:<id>` for the payment that "
            "did, a partner's `urn:microcred:partner:<id>`, or the context whose event did "
            "(`billing`, `catalog`); null where the change was recorded before actors were kept."
        ),
        examples=["staff:auth0|5f2b8c1e"],
    )
    source: str = Field(
        description="The context the change came through: a service's API, another's event, a partner.",
        examples=["enrollment"],
    )
