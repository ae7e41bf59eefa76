"""Which JSON-schema changes an event type may take without a new major version.

During a rollout, producers and consumers of the old and new minor version run side by side in
any order, so a change must keep both directions working: a new consumer reads old events, and
an old consumer reads new ones (it ignores fields it does not know). What passes:

- adding an optional field;
- adding a value to an enum (emit it only once the consumers that branch on the enum handle it);
- changing annotations: title, description, examples.

Everything else is breaking and needs a new event type, `...v<major+1>`: removing a field,
adding a required one, making an optional field required or a required one optional, changing a
field's type or nullability, removing an enum value, and changing any other validation keyword
(format, pattern, bounds, lengths, default). Both schemas are compared after inlining `$ref`s,
so a change inside a shared model (`Money`) counts for every event that contains it.
"""

from typing import Any

JsonSchema = dict[str, Any]

# Keywords that do not change what validates; `$defs` is compared where it is referenced instead.
_IGNORED = frozenset({"title", "description", "examples", "$comment", "deprecated", "$defs"})
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not")


def breaking_changes(old: JsonSchema, new: JsonSchema) -> list[str]:
    """Why `new` cannot replace `old` under the same major version; empty when it can."""
    return _compare(_inline(old, old), _inline(new, new), "$")


def _inline(node: Any, root: JsonSchema) -> Any:
    """`node` with every local `$ref` replaced by its target (siblings of the `$ref` win).

    The contract has no recursive models, so inlining terminates.
    """
    if isinstance(node, list):
        return [_inline(item, root) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return _inline({**target, **rest}, root)
    return {key: _inline(value, root) for key, value in node.items()}


def _compare(old: JsonSchema, new: JsonSchema, path: str) -> list[str]:
    problems: list[str] = []
    keys = (old.keys() | new.keys()) - _IGNORED
    for key in sorted(keys):
        old_value, new_value = old.get(key), new.get(key)
        if key == "properties":
            problems += _compare_properties(old, new, path)
        elif key == "required":
            continue  # judged with the properties, where a field's appearance is known
        elif key == "enum" and isinstance(old_value, list) and isinstance(new_value, list):
            removed = [value for value in old_value if value not in new_value]
            if removed:
                problems.append(f"{path}: enum values removed: {removed}")
        elif key in _SUBSCHEMAS and isinstance(old_value, dict) and isinstance(new_value, dict):
            problems += _compare(old_value, new_value, f"{path}.{key}")
        elif key in _SUBSCHEMA_LISTS and isinstance(old_value, list) and isinstance(new_value, list):
            if len(old_value) != len(new_value):
                problems.append(
                    f"{path}: {key} changed from {len(old_value)} to {len(new_value)} alternatives"
                )
            else:
                for index, (old_item, new_item) in enumerate(zip(old_value, new_value, strict=True)):
                    problems += _compare(old_item, new_item, f"{path}.{key}[{index}]")
        elif old_value != new_value:
            problems.append(f"{path}: {key} changed from {old_value!r} to {new_value!r}")
    return problems


def _compare_properties(old: JsonSchema, new: JsonSchema, path: str) -> list[str]:
    problems: list[str] = []
    old_properties: JsonSchema = old.get("properties", {})
    new_properties: JsonSchema = new.get("properties", {})
    old_required = set(old.get("required", ()))
    new_required = set(new.get("required", ()))
    for name in sorted(old_properties.keys() | new_properties.keys()):
        where = f"{path}.{name}"
        if name not in new_properties:
            problems.append(f"{where}: field removed")
        elif name not in old_properties:
            if name in new_required:
                problems.append(f"{where}: required field added")
        elif (name in old_required) != (name in new_required):
            problems.append(f"{where}: field made {'required' if name in new_required else 'optional'}")
        else:
            problems += _compare(old_properties[name], new_properties[name], where)
    return problems
