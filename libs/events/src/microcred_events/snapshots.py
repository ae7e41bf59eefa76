"""Committed JSON-schema snapshots of every event type, and the command that refreshes them.

`python -m microcred_events.snapshots` writes `libs/events/schemas/<type>.json` for every event
type whose schema changed. It refuses, and writes nothing, when a change is breaking under
`microcred_events.compatibility`: such a change needs a new event type (`...v2`), which gets its
own snapshot while the v1 snapshot stays. The tests fail while a snapshot is stale, so every
schema change is refreshed, and so reviewed, on purpose.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from microcred_events.compatibility import JsonSchema, breaking_changes
from microcred_events.registry import REGISTRY

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


class IncompatibleChangeError(Exception):
    """A schema changed in a way consumers of the same major version cannot follow."""


def current_schemas() -> dict[str, JsonSchema]:
    """The JSON schema of every registered event type, by type string."""
    return {event_type: cls.model_json_schema() for event_type, cls in REGISTRY.items()}


def load_snapshots(directory: Path = SCHEMA_DIR) -> dict[str, JsonSchema]:
    """The committed snapshots, by type string (the file name without `.json`)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def render(schema: JsonSchema) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_snapshots(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write the snapshots that are missing or stale; return their types.

    Raises `IncompatibleChangeError`, having written nothing, if any change is breaking.
    """
    committed = load_snapshots(directory)
    changed = {
        event_type: schema
        for event_type, schema in current_schemas().items()
        if committed.get(event_type) != schema
    }
    problems = [
        f"{event_type} {problem}"
        for event_type, schema in changed.items()
        if event_type in committed
        for problem in breaking_changes(committed[event_type], schema)
    ]
    if problems:
        raise IncompatibleChangeError(
            "breaking changes need a new major version of the event type:\n  " + "\n  ".join(problems)
        )
    directory.mkdir(parents=True, exist_ok=True)
    for event_type, schema in changed.items():
        (directory / f"{event_type}.json").write_text(render(schema))
    return sorted(changed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microcred_events.snapshots", description=__doc__)
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="where the snapshots live")
    args = parser.parse_args(argv)
    try:
        written = write_snapshots(args.dir)
    except IncompatibleChangeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print("\n".join(f"wrote {event_type}" for event_type in written) or "snapshots are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
