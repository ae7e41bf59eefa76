"""deploy/README.md, the operators' guide, documents every variable the services read."""

from collections.abc import Mapping

from tests.deploy.conftest import ROOT, SDK_VARIABLES, SettingsSpec


def test_every_setting_is_documented(settings_specs: Mapping[str, SettingsSpec]) -> None:
    guide = (ROOT / "deploy" / "README.md").read_text()
    read = set().union(*(spec.reads for spec in settings_specs.values())) | SDK_VARIABLES
    undocumented = sorted(variable for variable in read if f"`{variable}`" not in guide)
    assert not undocumented, f"deploy/README.md, Configuration, lacks {undocumented}"
