"""keel's web UI (server-rendered)."""

from __future__ import annotations

from typing import Any

__all__ = ["mount_ui"]


def mount_ui(api: Any) -> None:
    """Placeholder until the UI lands: nothing mounted."""
    return None
