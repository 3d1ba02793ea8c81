"""The settings registry and config-file validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import SETTINGS, Settings, load_settings
from keel.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "keel.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_match_the_contract() -> None:
    s = load_settings(env={})
    assert s.database_url == "sqlite:///.keel/keel.db" and s.redis_url is None and s.master_key is None
    assert (s.host, s.port, s.workers) == ("127.0.0.1", 4000, 1)


def test_every_setting_is_declared_once_and_documented() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert all(s.doc and s.env == "KEEL_" + s.name.upper() for s in SETTINGS)
    fields = set(Settings.__dataclass_fields__)
    assert set(names) <= fields


def test_precedence_override_env_file_default(tmp_path: Path) -> None:
    cfg = write(tmp_path, "port: 5000\nworkers: 3\nlog_level: debug\n")
    s = load_settings(cfg, env={"KEEL_PORT": "6000"}, overrides={"workers": 2})
    assert s.port == 6000  # env beats file
    assert s.workers == 2  # override beats file
    assert s.log_level == "debug"  # file beats default
    assert s.trace_queue_size == 100_000  # default


def test_models_and_fallbacks(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
models:
  - name: gpt-4o-mini
    provider: openai
    api_key: os.environ/TEST_OPENAI_KEY
    input_cost_per_mtok: 0.1
  - name: claude-haiku
    provider: anthropic
    model: claude-3-5-haiku-latest
    api_base: https://example.test/
routing:
  fallbacks:
    gpt-4o-mini: [claude-haiku]
""",
    )
    s = load_settings(cfg, env={"TEST_OPENAI_KEY": "sk-from-env"})
    assert s.models[0].api_key == "sk-from-env"
    assert (
        s.models[1].upstream_model == "claude-3-5-haiku-latest"
        and s.models[1].api_base == "https://example.test"
    )
    assert s.fallbacks == {"gpt-4o-mini": ("claude-haiku",)}


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "models:\n  - {name: a, provider: openai, api_key: os.environ/KEEL_TEST_SECRET}\n")
    monkeypatch.setenv("KEEL_TEST_SECRET", "sk-secret")
    assert load_settings(cfg).models[0].api_key == "sk-secret"
    monkeypatch.delenv("KEEL_TEST_SECRET")
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert (
        str(exc.value)
        == "invalid config: models[0].api_key: environment variable KEEL_TEST_SECRET is not set"
    )


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("models:\n  - {name: a}\n", "models[0].provider", "Field required"),
        ("models:\n  - {name: a, provider: openai, weight: -1}\n", "models[0].weight", "greater than 0"),
        ("models:\n  - {name: a, provider: openai, colour: red}\n", "models[0].colour", "unknown key"),
        ("models:\n  - {name: a, provider: openai, api_base: ftp://x}\n", "models[0].api_base", "http"),
        ("prot: 4000\n", "prot", "unknown key"),
        ("port: many\n", "port", "expected int"),
        ("port: 70000\n", "port", "at most 65535"),
        ("store_bodies: maybe\n", "store_bodies", "boolean"),
        ("database_url: mysql://x\n", "database_url", "sqlite"),
        (
            "models: [{name: a, provider: openai}]\nrouting: {fallbacks: {a: [b]}}\n",
            "routing.fallbacks.a",
            "unknown model 'b'",
        ),
        ("models: [{name: a, provider: openai}, {name: a, provider: openai}]\n", "models[1]", "duplicate"),
        ("- just\n- a list\n", "config", "mapping"),
        ("models: [\n", "config", "not valid YAML at line"),
    ],
)
def test_invalid_config_names_key_and_problem(tmp_path: Path, text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text), env={})
    assert exc.value.key == key
    assert problem in exc.value.problem


def test_env_value_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(env={"KEEL_WORKERS": "two"})
    assert exc.value.key == "KEEL_WORKERS"


def test_configuration_doc_lists_every_setting() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for s in SETTINGS:
        assert f"`{s.env}`" in doc and f"`{s.name}`" in doc, s.name
