"""keel's HTTP surface: the app factory."""

from keel.server.app import KeelApp, create_app, effective_models

__all__ = ["KeelApp", "create_app", "effective_models"]
