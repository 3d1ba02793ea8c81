"""`keel secrets`: keep provider API keys out of config files in plain text (`enc:` values)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console

__all__ = ["secrets"]

console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    sys.exit(2)


@click.group("secrets")
def secrets() -> None:
    """Encrypt provider API keys for the config file (decrypted at start with the secret key)."""


@secrets.command("key")
@click.option("--data-dir", default=None, help="Where to keep secret_key (default: KEEL_DATA_DIR or .keel).")
def secrets_key(data_dir: str | None) -> None:
    """Create <data_dir>/secret_key (mode 0600) if it does not exist, and say where it is."""
    from keel.config import generate_secret_key

    path = Path(data_dir or os.environ.get("KEEL_DATA_DIR") or ".keel") / "secret_key"
    if path.exists():
        console.print(f"{path} already exists; keeping it.", highlight=False)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_secret_key() + "\n")
    console.print(
        f"Wrote a new secret key to {path} (mode 0600). Back it up: without it, enc: values cannot be read.",
        highlight=False,
    )


@secrets.command("encrypt")
@click.argument("value", required=False)
@click.option("--data-dir", default=None, help="Where secret_key is (default: KEEL_DATA_DIR or .keel).")
def secrets_encrypt(value: str | None, data_dir: str | None) -> None:
    """Print enc:<token> for VALUE (read from stdin when omitted, so it stays out of shell history)."""
    from keel.config import encrypt_secret, read_secret_key

    key = read_secret_key(
        os.environ.get("KEEL_SECRET_KEY"), data_dir or os.environ.get("KEEL_DATA_DIR") or ".keel"
    )
    if not key:
        _fail("no secret key: run `keel secrets key` or set KEEL_SECRET_KEY")
        return
    plain = value if value is not None else sys.stdin.read().strip()
    if not plain:
        _fail("nothing to encrypt")
        return
    try:
        token = encrypt_secret(plain, key)
    except ValueError:
        _fail("the secret key is malformed (expected the output of `keel secrets key`)")
        return
    click.echo(token)
