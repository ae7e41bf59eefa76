"""The registry of event types: CloudEvents type string -> model class, checked at import."""

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from microcred_events import billing, catalog, enrollment, issuance, partner
from microcred_events.base import Event
from microcred_events.topics import Topic

TYPE_PATTERN = re.compile(r"org\.microcred\.(?P<context>[a-z_]+)\.[a-z_]+\.[a-z_]+\.v[1-9][0-9]*")


def key_field(event_class: type[Event]) -> FieldInfo:
    """The field named by `event_class.KEY`, following the dots through nested models."""
    model: type[BaseModel] = event_class
    *parents, leaf = event_class.KEY.split(".")
    for name in parents:
        annotation = model.model_fields[name].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise TypeError(f"{event_class.__name__}.KEY: {name} is not a nested model")
        model = annotation
    return model.model_fields[leaf]


def build_registry(event_classes: Iterable[type[Event]]) -> Mapping[str, type[Event]]:
    """Map each class's `TYPE` to it, refusing anything a producer or consumer could trip on.

    Raises `TypeError` when a type string is malformed or repeated, the topic is not in the
    topic map or belongs to another context, or `KEY` names no field.
    """
    registry: dict[str, type[Event]] = {}
    for cls in event_classes:
        match = TYPE_PATTERN.fullmatch(getattr(cls, "TYPE", ""))
        if match is None:
            raise TypeError(
                f"{cls.__name__}.TYPE must look like org.microcred.<context>.<subject>.<action>.v<major>"
            )
        if cls.TYPE in registry:
            raise TypeError(
                f"{cls.TYPE} is declared by both {registry[cls.TYPE].__name__} and {cls.__name__}"
            )
        topic = getattr(cls, "TOPIC", None)
        if not isinstance(topic, Topic):
            raise TypeError(f"{cls.__name__}.TOPIC must be a Topic")
        if topic.split(".")[0] != match["context"]:
            raise TypeError(f"{cls.__name__} is a {match['context']} event but goes to {topic}")
        try:
            key_field(cls)
        except (AttributeError, KeyError) as exc:
            raise TypeError(f"{cls.__name__}.KEY must name a field holding the aggregate id") from exc
        registry[cls.TYPE] = cls
    return MappingProxyType(registry)


REGISTRY: Mapping[str, type[Event]] = build_registry(
    (*catalog.EVENTS, *enrollment.EVENTS, *billing.EVENTS, *issuance.EVENTS, *partner.EVENTS)
)
"""Every event type of the contract, by CloudEvents type string; `decode` looks types up here."""
