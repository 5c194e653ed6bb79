"""docs/configuration.md is generated from the settings definitions, and must match them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from proxy import config
from proxy.configdoc import reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_the_reference_matches_the_definitions() -> None:
    assert DOC.read_text() == reference(), (
        "docs/configuration.md is out of date: run `python -m proxy.configdoc > "
        "docs/configuration.md`"
    )


def test_every_setting_and_variable_is_in_it() -> None:
    text = DOC.read_text()
    for name, cls in config._SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{name}.{f.name}`" in text
    for names in config.ENV_VARS.values():
        for var in names:
            assert f"`{var}`" in text
    for flag in config.FLAGS:
        assert f"`--{flag.replace('_', '-')}`" in text
    assert "sk-" not in text and "thriftgate-scope-v1" not in text  # no secret default shown
