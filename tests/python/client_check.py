"""Exercises clients/python (atelier_client) against a running `atelier up`, sync and async.
Run by tests/tests/python_client.rs.

    python client_check.py BASE_URL
"""

import asyncio
import hashlib
import sys
import uuid

from atelier_client import AsyncClient, AtelierError, Client

base = sys.argv[1]
data = b"atelier python client " * 100
want_sha = hashlib.sha256(data).hexdigest()

with Client(base) as c:
    up = c.upload(data)
    key = up["artifact"]["key"]
    assert c.download(key) == data

    spec = {"kind": "checksum", "input": key, "expected_sha256": want_sha}
    idem = uuid.uuid4().hex
    first = c.submit(spec, idempotency_key=idem)
    again = c.submit(spec, idempotency_key=idem)
    assert first["id"] == again["id"], "the same Idempotency-Key made a second job"
    done = c.wait(first["id"], timeout=60)
    assert done["state"] == "succeeded", done
    assert done["output"]["input"]["key"] == key, done["output"]
    report = c.download(done["output"]["report"]["key"])
    assert want_sha.encode() in report, report[:300]
    final = list(c.events(first["id"]))
    assert final and final[-1]["state"] == "succeeded", final

    other = c.wait(c.submit(spec)["id"], timeout=60)
    page = c.jobs(kind="checksum", limit=1)
    assert len(page["jobs"]) == 1 and page["jobs"][0]["id"] == other["id"], page
    assert "next_cursor" in page
    ids = [j["id"] for j in c.iter_jobs(kind="checksum", limit=1)]
    assert ids[:2] == [other["id"], first["id"]], ids

    with Client(base, priority="high") as hc:
        urgent = hc.wait(hc.submit(spec)["id"], timeout=60)
        assert urgent["priority"] == "high" and urgent["state"] == "succeeded", urgent
    with Client(base, priority="urgent") as bad:
        try:
            bad.submit(spec)
            raise AssertionError("an unknown priority was accepted")
        except AtelierError as e:
            assert e.status == 422 and e.code == "invalid_priority", e

    for i, (call, code) in enumerate([
        (lambda: c.cancel(first["id"]), "job_finished"),
        (lambda: c.job("not-a-job"), None),
        (lambda: c.jobs(state="bogus"), "invalid_query"),
        (lambda: c.submit(spec, webhook="https://example.com/hook"), "invalid_webhook"),
    ]):
        try:
            call()
            raise AssertionError(f"call {i}: no error")
        except AtelierError as e:
            assert 400 <= e.status < 500, e
            assert code is None or e.code == code, (e.code, code)


async def main():
    async with AsyncClient(base) as c:
        up = await c.upload(data)
        record = await c.submit({"kind": "checksum", "input": up["artifact"]["key"]})
        done = await c.wait(record["id"], timeout=60)
        assert done["state"] == "succeeded", done
        seen = [r async for r in c.events(record["id"])]
        assert seen[-1]["state"] == "succeeded"
        page = await c.jobs(kind="checksum")
        assert page["jobs"][0]["id"] == record["id"], page
        assert isinstance(await c.datasets(), list)


asyncio.run(main())
print("atelier_client: sync and async checks passed")
