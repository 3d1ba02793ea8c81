"""The gateway: the hot path from an incoming request to the upstream and back."""

from keel.gateway.auth import KeyCache, bearer_token
from keel.gateway.core import Gateway
from keel.gateway.routing import Deployment, ModelTable
from keel.gateway.stats import GatewayStats

__all__ = ["Deployment", "Gateway", "GatewayStats", "KeyCache", "ModelTable", "bearer_token"]
