"""Python client of the atelier gateway (see README.md): `Client` (sync) and `AsyncClient`."""

from ._client import AsyncClient, Client
from ._types import AtelierError, JobPage, JobRecord, TERMINAL

__all__ = ["Client", "AsyncClient", "AtelierError", "JobRecord", "JobPage", "TERMINAL"]
