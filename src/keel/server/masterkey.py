"""The master key: from settings, else generated once into <data_dir>/master_key (mode 0600)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from keel.config import Settings

__all__ = ["resolve_master_key"]


def resolve_master_key(settings: Settings) -> tuple[str, bool]:
    """Return (key, created_now). A newly generated key is written with mode 0600."""
    if settings.master_key:
        return settings.master_key, False
    path = Path(settings.data_dir) / "master_key"
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-keel-master-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    return key, True
