import json
import re
from pathlib import Path

import pytest

from microcred_events import REGISTRY
from microcred_events.compatibility import breaking_changes
from microcred_events.snapshots import (
    SCHEMA_DIR,
    IncompatibleChangeError,
    current_schemas,
    load_snapshots,
    main,
    render,
    write_snapshots,
)

COMMITTED = load_snapshots()
REFRESH = "refresh them with `python -m microcred_events.snapshots`"


@pytest.mark.parametrize("event_type", REGISTRY.keys())
def test_each_event_type_has_a_snapshot(event_type: str) -> None:
    assert event_type in COMMITTED, f"no snapshot for {event_type}: {REFRESH}"


@pytest.mark.parametrize("event_type", REGISTRY.keys())
def test_schema_is_compatible_with_its_snapshot(event_type: str) -> None:
    problems = breaking_changes(COMMITTED.get(event_type, {}), current_schemas()[event_type])

    assert not problems, f"{event_type} changed incompatibly; add a new major version instead:\n" + "\n".join(
        problems
    )


@pytest.mark.parametrize("event_type", REGISTRY.keys())
def test_snapshot_is_up_to_date(event_type: str) -> None:
    assert COMMITTED.get(event_type) == current_schemas()[event_type], f"{event_type} changed: {REFRESH}"


def test_an_event_type_leaves_only_for_a_newer_major() -> None:
    def split(event_type: str) -> tuple[str, int]:
        name, major = event_type.rsplit(".v", 1)
        return name, int(major)

    current = [split(event_type) for event_type in REGISTRY]
    for event_type in COMMITTED.keys() - REGISTRY.keys():
        name, major = split(event_type)
        assert any(n == name and m > major for n, m in current), (
            f"{event_type} has a snapshot but no model and no newer major: consumers still expect it"
        )


def test_snapshot_files_are_rendered_as_the_command_writes_them() -> None:
    for path in SCHEMA_DIR.glob("*.json"):
        assert path.read_text() == render(json.loads(path.read_text())), f"{path.name}: {REFRESH}"


class TestWriteSnapshots:
    def test_writes_missing_and_skips_unchanged(self, tmp_path: Path) -> None:
        assert write_snapshots(tmp_path) == sorted(REGISTRY)
        assert write_snapshots(tmp_path) == []
        assert load_snapshots(tmp_path) == current_schemas()

    def test_refreshes_a_compatible_change(self, tmp_path: Path) -> None:
        write_snapshots(tmp_path)
        path = tmp_path / "org.microcred.billing.payment.settled.v1.json"
        path.write_text(path.read_text().replace("The amount collected.", "Old wording."))

        assert write_snapshots(tmp_path) == ["org.microcred.billing.payment.settled.v1"]
        assert "The amount collected." in path.read_text()

    def test_refuses_a_breaking_change_and_writes_nothing(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        write_snapshots(tmp_path)
        settled = tmp_path / "org.microcred.billing.payment.settled.v1.json"
        schema = json.loads(settled.read_text())
        # As if the committed snapshot had a field the model no longer has.
        schema["properties"]["payer_country"] = {"type": "string"}
        schema["required"].append("payer_country")
        settled.write_text(render(schema))
        retired = tmp_path / "org.microcred.catalog.course.retired.v1.json"
        retired.unlink()

        with pytest.raises(IncompatibleChangeError, match=re.escape("payer_country: field removed")):
            write_snapshots(tmp_path)
        assert not retired.exists()
        assert main(["--dir", str(tmp_path)]) == 1
        assert "payer_country: field removed" in capsys.readouterr().err

    def test_command_reports_what_it_wrote(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["--dir", str(tmp_path)]) == 0
        assert "wrote org.microcred.catalog.course.published.v1" in capsys.readouterr().out
        assert main(["--dir", str(tmp_path)]) == 0
        assert capsys.readouterr().out == "snapshots are up to date\n"
