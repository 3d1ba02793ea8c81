"""Provider API keys encrypted at rest in the config (`enc:`), and never shown."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from keel.config import encrypt_secret, generate_secret_key, load_settings
from keel.errors import ConfigError
from tests.test_cli import run

PLAIN = "sk-live-0123456789abcdefABCDEF"


def _config(tmp_path: Path, api_key: str) -> Path:
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"models:\n  - {{name: gpt-4o-mini, provider: openai, api_key: '{api_key}'}}\n")
    return cfg


def test_cli_makes_a_key_and_encrypts_from_stdin(tmp_path: Path) -> None:
    env = {"KEEL_DATA_DIR": str(tmp_path / "data")}
    made = run(["secrets", "key"], tmp_path, env=env)
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "data" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    before = key_file.read_text()
    assert run(["secrets", "key"], tmp_path, env=env).returncode == 0 and key_file.read_text() == before

    import subprocess
    import sys

    enc = subprocess.run(
        [sys.executable, "-m", "keel.cli", "secrets", "encrypt"],
        input=PLAIN,
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enc.returncode == 0, enc.stderr
    token = enc.stdout.strip()
    assert token.startswith("enc:") and PLAIN not in token
    settings = load_settings(str(_config(tmp_path, token)), env=env)
    assert settings.models[0].api_key == PLAIN
    # nothing prints it
    assert PLAIN not in repr(settings) and PLAIN not in repr(settings.models[0])


def test_env_reference_may_hold_an_encrypted_value(tmp_path: Path) -> None:
    key = generate_secret_key()
    env = {"KEEL_SECRET_KEY": key, "OPENAI_KEY": encrypt_secret(PLAIN, key), "KEEL_DATA_DIR": str(tmp_path)}
    settings = load_settings(str(_config(tmp_path, "os.environ/OPENAI_KEY")), env=env)
    assert settings.models[0].api_key == PLAIN


@pytest.mark.parametrize(
    ("env_key", "expect"),
    [
        (None, "no secret key is set"),
        ("wrong", "cannot be decrypted with this secret key"),
    ],
)
def test_undecryptable_values_fail_clearly_without_the_secret(
    tmp_path: Path, env_key: str | None, expect: str
) -> None:
    token = encrypt_secret(PLAIN, generate_secret_key())
    env = {"KEEL_DATA_DIR": str(tmp_path)}
    if env_key == "wrong":
        env["KEEL_SECRET_KEY"] = generate_secret_key()
    with pytest.raises(ConfigError) as err:
        load_settings(str(_config(tmp_path, token)), env=env)
    msg = str(err.value)
    assert "models[0].api_key" in msg and expect in msg
    assert PLAIN not in msg and token not in msg
    # keel serve says the same in one line and exits 2
    r = run(["serve", "--config", str(tmp_path / "keel.yaml")], tmp_path, env=env)
    assert r.returncode == 2 and expect in r.stderr and token not in r.stderr + r.stdout


def test_encrypt_without_a_key_is_a_clear_error(tmp_path: Path) -> None:
    r = run(["secrets", "encrypt", "x"], tmp_path, env={"KEEL_DATA_DIR": str(tmp_path / "none")})
    assert r.returncode == 2 and "keel secrets key" in r.stderr
