"""config/server.toml documents every setting at its default, and stays true."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from spectralmc_server.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "server.toml"


def test_example_config_is_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("SPECTRALMC_")]:
        monkeypatch.delenv(name)
    assert Settings.load(EXAMPLE) == Settings()


def test_example_config_names_every_setting() -> None:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    for name, field in Settings.model_fields.items():
        assert name in doc or f"# {name} =" in text, f"config/server.toml does not mention {name}"
        sub = getattr(field.annotation, "model_fields", None)
        if sub is not None and name in doc:
            missing = set(sub) - set(doc[name]) - {k for k in sub if f"# {k} =" in text}
            assert not missing, f"[{name}] in config/server.toml lacks {sorted(missing)}"
