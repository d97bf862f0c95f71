"""Uses a client generated from the gateway's /openapi.json by openapi-python-client (a common
generator) against a running gateway with a checksum worker: upload, submit, follow to the end,
list, an error answer. Run by tests/tests/openapi.rs.

    python generated_client_check.py PACKAGE_PARENT PACKAGE BASE_URL
"""

import hashlib
import importlib
import sys
import time

parent, package, base = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, parent)
gen = importlib.import_module(package)
upload = importlib.import_module(f"{package}.api.artifacts.upload")
submit_job = importlib.import_module(f"{package}.api.jobs.submit_job")
get_job = importlib.import_module(f"{package}.api.jobs.get_job")
list_jobs = importlib.import_module(f"{package}.api.jobs.list_jobs")
types = importlib.import_module(f"{package}.types")
models = importlib.import_module(f"{package}.models")

client = gen.AuthenticatedClient(base_url=base, token="unused")
data = b"generated client " * 64
up = upload.sync(client=client, body=types.File(payload=data, file_name="x.bin"))
assert isinstance(up, models.UploadResponse), up
assert up.artifact.sha256 == hashlib.sha256(data).hexdigest(), up

body = models.SubmitJob.from_dict(
    {"schema_version": 1, "spec": {"kind": "checksum", "input": up.artifact.key}}
)
record = submit_job.sync(client=client, body=body)
assert isinstance(record, models.JobRecord), record
deadline = time.time() + 60
while True:
    record = get_job.sync(client=client, id=str(record.id))
    assert isinstance(record, models.JobRecord), record
    if record.state.value in ("succeeded", "failed", "cancelled"):
        break
    assert time.time() < deadline, record
    time.sleep(0.1)
assert record.state.value == "succeeded", record.to_dict()
assert record.output.to_dict()["kind"] == "checksum", record.output.to_dict()

page = list_jobs.sync(client=client, kind="checksum")
assert isinstance(page, models.JobPage) and page.jobs[0].id == record.id, page

bad = list_jobs.sync_detailed(client=client, state="bogus")
assert bad.status_code == 422 and isinstance(bad.parsed, models.ApiErrorBody), bad
assert bad.parsed.error.code == "invalid_query", bad.parsed.to_dict()
print("generated client: ok")
