"""An async client of a keel server for the eval runner: the gateway and the eval/dataset/prompt API.

Everything goes over HTTP like any other client, so generations are traced and costed by the
gateway and runs are stored by the server (which may be another machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

__all__ = ["EvalApiError", "EvalClient"]


class EvalApiError(RuntimeError):
    """The keel server refused a call or could not be reached; the message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EvalClient:
    """One connection pool to keel for the gateway calls and the REST API calls of a run."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 120.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> EvalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kw: Any) -> Any:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise EvalApiError(f"cannot reach keel at {self.base_url}: {type(exc).__name__}: {exc}") from None
        if r.status_code not in ok:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text[:300]
            raise EvalApiError(f"{method} {path}: HTTP {r.status_code}: {message}", r.status_code)
        return r.json() if r.content else None

    # -- datasets ---------------------------------------------------------------------------------

    async def get_dataset(self, ref: str) -> dict[str, Any] | None:
        try:
            return dict(await self._call("GET", f"/api/datasets/{ref}"))
        except EvalApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_datasets(self) -> list[dict[str, Any]]:
        return list(await self._call("GET", "/api/datasets"))

    async def push_items(
        self,
        name: str,
        items: Sequence[dict[str, Any]],
        *,
        replace: bool = True,
        description: str | None = None,
    ) -> dict[str, Any]:
        """Create the dataset if needed and upsert ``items`` (``replace``: drop the others)."""
        if await self.get_dataset(name) is None:
            try:
                await self._call("POST", "/api/datasets", json={"name": name, "description": description})
            except EvalApiError as exc:
                if exc.status != 409:  # created meanwhile by someone else
                    raise
        return dict(
            await self._call(
                "POST", f"/api/datasets/{name}/items", json={"items": list(items), "replace": replace}
            )
        )

    async def dataset_items(self, ref: str, version: int | None = None) -> list[dict[str, Any]]:
        params = {"version": version} if version is not None else {}
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await self._call(
                "GET", f"/api/datasets/{ref}/items", params={**params, "limit": 5000, "offset": offset}
            )
            out.extend(page["data"])
            if len(page["data"]) < 5000:
                return out
            offset += len(page["data"])

    # -- prompts ----------------------------------------------------------------------------------

    async def prompt_version(self, name: str, ref: str) -> dict[str, Any]:
        """A registry prompt version by number, label or 'latest'."""
        return dict(await self._call("GET", f"/api/prompts/{name}/versions/{ref}"))

    # -- runs -------------------------------------------------------------------------------------

    async def create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("POST", "/api/evals/runs", json=body))

    async def add_results(self, run_id: str, rows: Sequence[dict[str, Any]]) -> None:
        await self._call("POST", f"/api/evals/runs/{run_id}/results", json={"results": list(rows)})

    async def finish_run(
        self, run_id: str, *, status: str, summary: dict[str, Any], scoring_cost_usd: float
    ) -> dict[str, Any]:
        return dict(
            await self._call(
                "POST",
                f"/api/evals/runs/{run_id}/finish",
                json={"status": status, "summary": summary, "scoring_cost_usd": scoring_cost_usd},
            )
        )

    async def get_run(self, ref: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/api/evals/runs/{ref}"))

    async def gate(self, run: str, baseline: str) -> dict[str, Any]:
        """Have the server gate ``run`` against ``baseline`` and record the verdict on the run."""
        return dict(await self._call("POST", f"/api/evals/runs/{run}/gate", json={"baseline": baseline}))

    async def compare(self, base: str, head: str, *, items: bool = False) -> dict[str, Any]:
        return dict(
            await self._call(
                "GET",
                "/api/evals/compare",
                params={"base": base, "head": head, "items": "true" if items else "false"},
            )
        )
