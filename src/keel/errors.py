"""Errors that reach API callers, rendered in the shape of the API they called.

Every error keel returns is a :class:`KeelError`: an HTTP status, an error ``type``
(OpenAI's vocabulary) and a machine-readable ``code``.  The gateway renders it as
OpenAI JSON (``{"error": {...}}``) or Anthropic JSON (``{"type": "error", ...}``)
depending on the route.  Messages never carry stack traces or secrets.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

__all__ = [
    "BadRequest",
    "ConfigError",
    "Forbidden",
    "KeelError",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "SecretScrubFilter",
    "Unauthorized",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "anthropic_error_body",
    "openai_error_body",
    "scrub_secrets",
]

# Credential formats that must never reach an error message or a log line (an upstream may echo
# the key it was sent; an exception may carry a URL with a token). Kept to well-known shapes: the
# guardrails' secret detector covers request bodies with more (entropy, context) than this needs.
_SECRET_RE = re.compile(
    r"(?P<keep>sk-ant-|sk-keel-|pk-keel-|sk-proj-|sk-|ghp_|gho_|github_pat_|xox[abprs]-|AIza|AKIA|hf_|glpat-)"
    r"[A-Za-z0-9_\-]{12,}"
    r"|(?P<bearer>[Bb]earer\s+)[A-Za-z0-9._~+/=\-]{12,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)


def scrub_secrets(text: str) -> str:
    """``text`` with credential-shaped substrings replaced (their prefix kept, for diagnosis)."""
    if not text:
        return text

    def repl(m: re.Match[str]) -> str:
        if m.group("keep"):
            return m.group("keep") + "[redacted]"
        if m.group("bearer"):
            return m.group("bearer") + "[redacted]"
        return "[redacted private key]"

    return _SECRET_RE.sub(repl, text)


class SecretScrubFilter(logging.Filter):
    """A logging filter that scrubs credentials from every record's message (installed by ``keel serve``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = scrub_secrets(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if scrub_secrets(text) != text:  # keep the traceback, minus the secret
                record.exc_text = scrub_secrets(text)
        return True


# Anthropic names its error types differently from OpenAI; map by status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"invalid config: {key}: {problem}")
        self.key = key
        self.problem = problem


class KeelError(Exception):
    """An error with an HTTP status, meant to be shown to the API caller."""

    status: int = 500
    type: str = "api_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        message = scrub_secrets(message)
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.param = param


class BadRequest(KeelError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(KeelError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(KeelError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(KeelError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(KeelError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(KeelError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(KeelError):
    """The upstream provider failed (after retries and fallbacks)."""

    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


def openai_error_body(err: KeelError) -> bytes:
    """Serialise ``err`` the way the OpenAI API does."""
    body: dict[str, Any] = {"message": err.message, "type": err.type, "code": err.code, "param": err.param}
    return orjson.dumps({"error": body})


def anthropic_error_body(err: KeelError) -> bytes:
    """Serialise ``err`` the way the Anthropic API does."""
    etype = _ANTHROPIC_TYPES.get(err.status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": etype, "message": err.message, "code": err.code}})
