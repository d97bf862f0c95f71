"""`Client` and `AsyncClient`: the same calls, blocking or as coroutines.

Every request is retried on a dropped connection, a 503 or a 429 (after the gateway's
`Retry-After`, else with backoff), `retries` times. Requests that create a job carry an
`Idempotency-Key` made once per call, so the gateway answers a retry with the job the first
attempt created instead of making a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional

import httpx

from ._types import TERMINAL, AtelierError, JobPage, JobRecord

_RETRY_STATUS = {429, 503}


class _Request:
    """One call, built once and sent as many times as retries need."""

    def __init__(self, method: str, path: str, *, params=None, json_body=None, content=None,
                 headers: Optional[Dict[str, str]] = None):
        self.method, self.path = method, path
        self.params = {k: v for k, v in (params or {}).items() if v is not None}
        self.json, self.content = json_body, content
        self.headers = dict(headers or {})


class _Base:
    def __init__(self, base_url: str, api_key: Optional[str], timeout: float, retries: int,
                 priority: Optional[str] = None):
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("ATELIER_API_KEY")
        self._headers = {"authorization": f"Bearer {key}"} if key else {}
        if priority:
            # The queue ("high", "normal", "low") of every job this client creates.
            self._headers["atelier-priority"] = priority
        self.timeout, self.retries = timeout, retries

    @staticmethod
    def _creating(path: str, body: Any, idempotency_key: Optional[str], webhook: Optional[str]) -> _Request:
        headers = {"idempotency-key": idempotency_key or uuid.uuid4().hex}
        if webhook:
            headers["atelier-webhook"] = webhook
        return _Request("POST", path, json_body=body, headers=headers)

    @staticmethod
    def _wait_for(attempt: int, resp: Optional[httpx.Response]) -> float:
        if resp is not None:
            try:
                return min(float(resp.headers.get("retry-after", "")), 30.0)
            except ValueError:
                pass
        return min(0.2 * 2 ** attempt, 5.0)

    @staticmethod
    def _check(resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            raise AtelierError.from_response(resp.status_code, resp.content, resp.headers.get("retry-after"))
        return resp

    @staticmethod
    def _jobs_request(kind, state, since, limit, cursor, owner) -> _Request:
        return _Request("GET", "/v1/jobs", params={"kind": kind, "state": state, "since": since,
                                                   "limit": limit, "cursor": cursor, "owner": owner})

    @staticmethod
    def _sse_records(lines: List[str]) -> Optional[JobRecord]:
        data = "\n".join(l[5:].lstrip() for l in lines if l.startswith("data:"))
        return json.loads(data) if data else None


class Client(_Base):
    """Blocking client. `api_key`: else `ATELIER_API_KEY`; none for a gateway without auth."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, *, timeout: float = 60.0,
                 retries: int = 5, priority: Optional[str] = None):
        super().__init__(base_url, api_key, timeout, retries, priority)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, r: _Request) -> httpx.Response:
        for attempt in range(self.retries + 1):
            resp = None
            try:
                resp = self._http.request(r.method, r.path, params=r.params, json=r.json,
                                          content=r.content, headers=r.headers)
                if resp.status_code not in _RETRY_STATUS or attempt == self.retries:
                    return self._check(resp)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            time.sleep(self._wait_for(attempt, resp))
        raise AssertionError("unreachable")

    # Artifacts
    def upload(self, data: bytes, content_type: str = "application/octet-stream") -> Dict[str, Any]:
        """Stores bytes; `{"artifact": {"key", ...}, "created"}`."""
        return self._send(_Request("POST", "/v1/uploads", content=data,
                                   headers={"content-type": content_type})).json()

    def download(self, key: str) -> bytes:
        return self._send(_Request("GET", f"/v1/artifacts/{key}")).content

    # Jobs
    def submit(self, spec: Mapping[str, Any], *, idempotency_key: Optional[str] = None,
               webhook: Optional[str] = None) -> JobRecord:
        """Queues a job (`spec` has its `kind`); its record."""
        body = {"schema_version": 1, "spec": dict(spec)}
        return self._send(self._creating("/v1/jobs", body, idempotency_key, webhook)).json()

    def txt2img(self, spec: Mapping[str, Any], *, idempotency_key: Optional[str] = None,
                webhook: Optional[str] = None) -> JobRecord:
        return self._send(self._creating("/v1/txt2img", dict(spec), idempotency_key, webhook)).json()

    def job(self, job_id: str) -> JobRecord:
        return self._send(_Request("GET", f"/v1/jobs/{job_id}")).json()

    def cancel(self, job_id: str) -> JobRecord:
        return self._send(_Request("DELETE", f"/v1/jobs/{job_id}")).json()

    def jobs(self, *, kind=None, state=None, since=None, limit=None, cursor=None, owner=None) -> JobPage:
        """One page of this key's jobs, newest first."""
        return self._send(self._jobs_request(kind, state, since, limit, cursor, owner)).json()

    def iter_jobs(self, **filters) -> Iterator[JobRecord]:
        """Every job the filters match, page after page."""
        cursor = None
        while True:
            page = self.jobs(cursor=cursor, **filters)
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def events(self, job_id: str, *, read_timeout: Optional[float] = None) -> Iterator[JobRecord]:
        """The job's record at every change, until it ends (the gateway's SSE stream)."""
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            lines: List[str] = []
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    continue
                record = self._sse_records(lines)
                lines = []
                if record is not None:
                    yield record
                    if record["state"] in TERMINAL:
                        return

    def wait(self, job_id: str, timeout: Optional[float] = None) -> JobRecord:
        """The job's final record (follows its events; `TimeoutError` after `timeout` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = self.job(job_id)
        while last["state"] not in TERMINAL:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {job_id} is still {last['state']} after {timeout} s")
            try:
                for record in self.events(job_id, read_timeout=remaining):
                    last = record
            except httpx.ReadTimeout:
                continue
        return last

    # Datasets and search
    def datasets(self) -> List[Dict[str, Any]]:
        return self._send(_Request("GET", "/v1/datasets")).json()

    def dataset_version(self, name: str, version: Optional[int] = None) -> Dict[str, Any]:
        v = "latest" if version is None else str(version)
        return self._send(_Request("GET", f"/v1/datasets/{name}/versions/{v}")).json()

    def search(self, dataset: str, *, text: Optional[str] = None, image_id: Optional[str] = None,
               k: int = 10, **filters) -> Dict[str, Any]:
        params = {"dataset": dataset, "text": text, "image_id": image_id, "k": k, **filters}
        return self._send(_Request("GET", "/v1/search", params=params)).json()


class AsyncClient(_Base):
    """`Client`'s calls as coroutines (`events` is an async iterator)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, *, timeout: float = 60.0,
                 retries: int = 5, priority: Optional[str] = None):
        super().__init__(base_url, api_key, timeout, retries, priority)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, r: _Request) -> httpx.Response:
        for attempt in range(self.retries + 1):
            resp = None
            try:
                resp = await self._http.request(r.method, r.path, params=r.params, json=r.json,
                                                content=r.content, headers=r.headers)
                if resp.status_code not in _RETRY_STATUS or attempt == self.retries:
                    return self._check(resp)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            await asyncio.sleep(self._wait_for(attempt, resp))
        raise AssertionError("unreachable")

    async def upload(self, data: bytes, content_type: str = "application/octet-stream") -> Dict[str, Any]:
        return (await self._send(_Request("POST", "/v1/uploads", content=data,
                                          headers={"content-type": content_type}))).json()

    async def download(self, key: str) -> bytes:
        return (await self._send(_Request("GET", f"/v1/artifacts/{key}"))).content

    async def submit(self, spec: Mapping[str, Any], *, idempotency_key: Optional[str] = None,
                     webhook: Optional[str] = None) -> JobRecord:
        body = {"schema_version": 1, "spec": dict(spec)}
        return (await self._send(self._creating("/v1/jobs", body, idempotency_key, webhook))).json()

    async def txt2img(self, spec: Mapping[str, Any], *, idempotency_key: Optional[str] = None,
                      webhook: Optional[str] = None) -> JobRecord:
        return (await self._send(self._creating("/v1/txt2img", dict(spec), idempotency_key, webhook))).json()

    async def job(self, job_id: str) -> JobRecord:
        return (await self._send(_Request("GET", f"/v1/jobs/{job_id}"))).json()

    async def cancel(self, job_id: str) -> JobRecord:
        return (await self._send(_Request("DELETE", f"/v1/jobs/{job_id}"))).json()

    async def jobs(self, *, kind=None, state=None, since=None, limit=None, cursor=None, owner=None) -> JobPage:
        return (await self._send(self._jobs_request(kind, state, since, limit, cursor, owner))).json()

    async def events(self, job_id: str) -> AsyncIterator[JobRecord]:
        async with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                self._check(resp)
            lines: List[str] = []
            async for line in resp.aiter_lines():
                if line:
                    lines.append(line)
                    continue
                record = self._sse_records(lines)
                lines = []
                if record is not None:
                    yield record
                    if record["state"] in TERMINAL:
                        return

    async def wait(self, job_id: str, timeout: Optional[float] = None) -> JobRecord:
        async def follow() -> JobRecord:
            last = await self.job(job_id)
            while last["state"] not in TERMINAL:
                async for record in self.events(job_id):
                    last = record
            return last

        return await asyncio.wait_for(follow(), timeout)

    async def datasets(self) -> List[Dict[str, Any]]:
        return (await self._send(_Request("GET", "/v1/datasets"))).json()

    async def search(self, dataset: str, *, text: Optional[str] = None, image_id: Optional[str] = None,
                     k: int = 10, **filters) -> Dict[str, Any]:
        params = {"dataset": dataset, "text": text, "image_id": image_id, "k": k, **filters}
        return (await self._send(_Request("GET", "/v1/search", params=params))).json()
