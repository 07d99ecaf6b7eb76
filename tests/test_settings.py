"""Settings.load: defaults < TOML file < SPECTRALMC_ environment < explicit overrides;
unknown keys rejected; derived properties (store_uri, serves, trains)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from spectralmc_server.settings import Settings, default_data_dir


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SPECTRALMC_ variable from the caller's environment; data under tmp_path."""
    for name in [k for k in os.environ if k.startswith("SPECTRALMC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = Settings.load()
    assert (s.host, s.port, s.role) == ("127.0.0.1", 8080, "all")
    assert s.models == ["gbm", "heston", "merton", "asian", "rbergomi"]
    assert s.store is None
    assert s.admin_token is None
    assert s.queue.max_wait_seconds == 0.002
    assert s.queue.max_batch_contracts == 4096
    assert s.train.enabled is True
    assert s == Settings()


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    config = write(
        tmp_path / "server.toml",
        'port = 9000\npoll_seconds = 0.5\nadmin_token = "t"\n[queue]\nmax_batch_contracts = 128\n',
    )
    s = Settings.load(config)
    assert s.port == 9000
    assert s.poll_seconds == 0.5
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "t"
    assert s.queue.max_batch_contracts == 128
    assert s.queue.max_wait_seconds == 0.002  # the rest of [queue] keeps its defaults
    assert s.host == "127.0.0.1"


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "server.toml",
        'port = 9000\nadmin_token = "from-file"\n[queue]\nmax_batch_contracts = 128\nmax_wait_seconds = 0.01\n',
    )
    monkeypatch.setenv("SPECTRALMC_PORT", "9100")
    monkeypatch.setenv("SPECTRALMC_ADMIN_TOKEN", "from-env")
    monkeypatch.setenv("SPECTRALMC_QUEUE__MAX_WAIT_SECONDS", "0.005")
    s = Settings.load(config)
    assert s.port == 9100
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "from-env"
    assert s.queue.max_wait_seconds == 0.005
    assert s.queue.max_batch_contracts == 128  # nested tables merge: the file's value stays


def test_env_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRALMC_ROLE", "serve")
    monkeypatch.setenv("SPECTRALMC_TRAIN__ENABLED", "false")
    s = Settings.load()
    assert s.role == "serve"
    assert s.train.enabled is False


def test_overrides_beat_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "server.toml", 'port = 9000\nhost = "0.0.0.0"\nrole = "serve"\n')
    monkeypatch.setenv("SPECTRALMC_PORT", "9100")
    s = Settings.load(config, port=9200, role="all")
    assert s.port == 9200
    assert s.role == "all"
    assert s.host == "0.0.0.0"


def test_none_overrides_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "server.toml", 'port = 9000\nrole = "serve"\n')
    monkeypatch.setenv("SPECTRALMC_PORT", "9100")
    s = Settings.load(config, port=None, role=None, host=None, data_dir=None, store=None)
    assert s.port == 9100
    assert s.role == "serve"
    assert s.host == "127.0.0.1"
    assert s.store is None


def test_load_leaves_no_toml_behind(tmp_path: Path) -> None:
    Settings.load(write(tmp_path / "server.toml", "port = 9000\n"))
    assert Settings().port == 8080
    assert Settings.load().port == 8080


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("bogus_key = 1\n", "bogus_key"),
        ("admin_tokn = 'x'\n", "admin_tokn"),
        ("[queue]\nmax_wait = 0.1\n", "queue.max_wait"),
        ("[train]\nenable = false\n", "train.enable"),
        ("[s3]\nendpoint = 'http://x'\n", "s3.endpoint"),
    ],
)
def test_unknown_toml_keys_are_rejected(tmp_path: Path, toml: str, field: str) -> None:
    config = write(tmp_path / "server.toml", toml)
    with pytest.raises(ValidationError) as info:
        Settings.load(config)
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert field in locs, locs
    assert all(e["type"] == "extra_forbidden" for e in info.value.errors())
    assert field in str(info.value)


def test_unknown_nested_env_key_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRALMC_QUEUE__BOGUS", "1")
    with pytest.raises(ValidationError, match=r"queue\.bogus"):
        Settings.load()


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        Settings.load(bogus=1)


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('role = "bogus"\n', "role"),
        ("port = 70000\n", "port"),
        ("poll_seconds = 0\n", "poll_seconds"),
        ("models = []\n", "models"),
        ("[queue]\nmax_wait_seconds = 2\n", "queue.max_wait_seconds"),
        ("[queue]\nmax_batch_contracts = 0\n", "queue.max_batch_contracts"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, toml: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings.load(write(tmp_path / "server.toml", toml))
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert locs == [field]


def test_invalid_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRALMC_PORT", "notaport")
    with pytest.raises(ValidationError) as info:
        Settings.load()
    assert [e["loc"] for e in info.value.errors()] == [("port",)]


def test_default_data_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_data_dir() == tmp_path / "xdg" / "spectralmc"
    assert Settings.load().data_dir == tmp_path / "xdg" / "spectralmc"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "spectralmc"


def test_store_uri_defaults_to_data_dir_store(tmp_path: Path) -> None:
    s = Settings.load(data_dir=tmp_path / "data")
    assert s.store_uri == (tmp_path / "data" / "store").as_uri()
    assert s.store_uri.startswith("file:///")
    assert Settings.load().store_uri == (tmp_path / "xdg" / "spectralmc" / "store").as_uri()


def test_store_uri_of_a_relative_data_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.load(data_dir=Path("rel"))
    assert s.store_uri == (tmp_path.resolve() / "rel" / "store").as_uri()


def test_explicit_store_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRALMC_STORE", "s3://bucket/prefix")
    assert Settings.load(data_dir=tmp_path).store_uri == "s3://bucket/prefix"
    assert Settings.load(store="file:///srv/models").store_uri == "file:///srv/models"


@pytest.mark.parametrize(
    ("role", "enabled", "serves", "trains"),
    [
        ("all", True, True, True),
        ("all", False, True, False),
        ("serve", True, True, False),
        ("serve", False, True, False),
        ("train", True, False, True),
        ("train", False, False, True),  # a trainer trains whatever train.enabled says
    ],
)
def test_serves_and_trains_per_role(role: str, enabled: bool, serves: bool, trains: bool) -> None:
    s = Settings.load(role=role, train={"enabled": enabled})
    assert (s.serves, s.trains) == (serves, trains)


def test_train_role_needs_a_served_model(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"train\.model 'heston' must be one of models \['gbm'\]"):
        Settings.load(role="train", models=["gbm"], train={"model": "heston"})
    config = write(tmp_path / "server.toml", 'role = "train"\nmodels = ["gbm"]\n[train]\nmodel = "heston"\n')
    with pytest.raises(ValidationError, match=r"train\.model"):
        Settings.load(config)
    ok = Settings.load(role="train", models=["gbm", "heston"], train={"model": "heston"})
    assert ok.trains and not ok.serves
    # Role all only notes a trained model it does not serve (the server reports it).
    assert Settings.load(role="all", train={"model": "heston"}).train.model == "heston"


def test_settings_are_frozen() -> None:
    s = Settings.load()
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.queue.max_wait_seconds = 0.5  # type: ignore[misc]


def test_admin_token_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRALMC_ADMIN_TOKEN", "hunter2")
    s = Settings.load()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "hunter2"
