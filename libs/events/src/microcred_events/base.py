"""What every event shares: the frozen contract model, the `Event` base, `Money` and UTC times."""

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from microcred_events.topics import Topic

INT64_MAX = 2**63 - 1
"""Upper bound of every integer in the contract: consumers store them in PostgreSQL `bigint`."""


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        # 9999-12-31T23:00-05:00 is valid ISO 8601 but past datetime.max in UTC; pydantic only turns
        # ValueError into a validation error, and decoding must never crash on a crafted body.
        raise ValueError("datetime is out of range once converted to UTC") from exc


UtcDateTime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware instant, normalised to UTC (serialised with a `Z`); naive datetimes are refused."""

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
# Who acted, for the audit trail: `<role>:<token subject>` for a person (`staff:auth0|sam`), a
# partner's `urn:microcred:partner:<id>`, or the context whose event caused the change (`billing`).
Actor = Annotated[str, StringConstraints(min_length=1, max_length=500)]
ACTOR_EXAMPLE = "staff:auth0|5f2b8c1e"

EmailAddress = Annotated[str, StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]

Score = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
"""A result in percent, 0 to 100."""


def _open_schema(schema: dict[str, Any]) -> None:
    schema.pop("additionalProperties", None)


class ContractModel(BaseModel):
    """Base of every model in the contract: immutable, and strict about what we produce.

    Unknown fields: constructing a model in Python forbids them (`extra="forbid"`), so a producer's
    typo fails at once and mypy's pydantic plugin checks keyword arguments. On the wire the
    contract is open: additive changes (a new optional field) keep the major version, so a
    consumer built against an older minor must accept an event that carries a field it does not
    know yet. `decode` therefore validates with `extra="ignore"`, and the published JSON schemas
    leave out `additionalProperties: false` to tell non-Python consumers the same.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_open_schema)


class Money(ContractModel):
    """An amount of money: integer minor units of an ISO 4217 currency, never a float."""

    amount_minor: int = Field(
        strict=True,
        ge=0,
        le=INT64_MAX,
        description="Amount in the currency's minor unit (cents for EUR and USD); 0 means free.",
        examples=[4900],
    )
    currency: str = Field(
        pattern=r"^[A-Z]{3}$",
        description="ISO 4217 alphabetic currency code, upper case.",
        examples=["EUR"],
    )


class Event(ContractModel):
    """Base of every event type.

    Each concrete event declares, once:
    - `TYPE`: its CloudEvents type, `org.microcred.<context>.<subject>.<action>.v<major>`;
    - `TOPIC`: the topic of the aggregate it belongs to (see `microcred_events.topics`);
    - `KEY`: the dotted path of the field holding the aggregate id, which becomes the Kafka key
      and `ce_subject`, so all events of one aggregate land on one partition, in order.
    """

    TYPE: ClassVar[str]
    TOPIC: ClassVar[Topic]
    KEY: ClassVar[str]

    def aggregate_id(self) -> str:
        """The id of the aggregate this event belongs to: the Kafka message key."""
        value: object = self
        for name in self.KEY.split("."):
            value = getattr(value, name)
        return str(value)


def example_data(model: type[BaseModel]) -> dict[str, Any]:
    """A JSON-ready example of `model`, made of the first example of each of its fields.

    Nested models' fields use `example_data(Nested)` as their example, so examples compose; tests
    build an instance of every event from it, and the AsyncAPI document shows it.
    """
    return {name: field.examples[0] for name, field in model.model_fields.items() if field.examples}
