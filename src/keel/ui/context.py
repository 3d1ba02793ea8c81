"""What a UI page module gets from :func:`keel.ui.mount_ui`: rendering and the signed-in principal.

A page module (``keel/ui/<area>.py``) exposes ``build(ui: UIContext) -> APIRouter``; ``mount_ui``
includes the routers of the modules listed in ``keel.ui.PAGE_MODULES``.  Pages render templates
from ``keel/ui/templates`` that extend ``base.html``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from keel.types import Principal

__all__ = ["UIContext"]


@dataclass(frozen=True)
class UIContext:
    render: Callable[..., HTMLResponse]
    """``render(request, template, status=200, **ctx)``: a page with keel's security headers."""
    principal: Callable[[Request], Principal | None]
    """The principal of the request's login cookie, or None."""
    to_login: Callable[[Request], Response]
    """A redirect to the login page that comes back here afterwards."""
    who: Callable[[Request, Principal], dict[str, Any]]
    """What the top bar shows about the signed-in key (pass as ``who=`` to render)."""
    state: Callable[[Request], Any]
    """The app's KeelState (store, gateway, settings, ...)."""

    def scope(self, p: Principal) -> str | None:
        """The project a principal may see: None (all) for the master key."""
        return None if p.is_master else p.project_id
