"""The gateway's records, as typed dictionaries, and its errors."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, TypedDict

#: Job states after which nothing changes.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ErrorInfo(TypedDict):
    code: str
    message: str


class _JobRecordRequired(TypedDict):
    schema_version: int
    id: str
    kind: str
    service: str
    state: str
    spec: Dict[str, Any]
    attempts: int
    created_at: str
    updated_at: str


class JobRecord(_JobRecordRequired, total=False):
    """A job's record (`GET /v1/jobs/{id}`)."""

    submitted_by: str
    progress: Dict[str, Any]
    output: Dict[str, Any]
    error: ErrorInfo
    worker: str
    interrupted: int


class JobPage(TypedDict, total=False):
    """`GET /v1/jobs`: newest first; `next_cursor` absent on the last page."""

    jobs: List[JobRecord]
    next_cursor: str


class AtelierError(Exception):
    """A non-2xx answer: its HTTP status and the gateway's `code` and `message`."""

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, status: int, body: bytes, retry_after: Optional[str]) -> "AtelierError":
        code, message = "http_error", body.decode("utf-8", "replace")[:500]
        try:
            err = json.loads(body)["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            pass
        wait = None
        if retry_after:
            try:
                wait = float(retry_after)
            except ValueError:
                wait = None
        return cls(status, code, message, wait)
