"""/openapi.json describes what hatchd really does (no daemon needed: the document is static)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hatchvm.api.app import create_app


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return create_app(None).openapi()  # type: ignore[arg-type]


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_every_route_is_an_operation(doc) -> None:
    ids = sorted(op["operationId"] for _, _, op in operations(doc))
    assert ids == sorted(
        """healthz create_vm list_vms get_vm stop_vm start_vm delete_vm snapshot_vm restore_vm
        list_snapshots get_snapshot delete_snapshot create_route list_routes delete_route
        list_images get_image get_console get_metrics exec_vm exec_vm_stream list_processes
        get_process kill_process delete_process upload_file download_file stat_file list_files
        delete_file fork_vm fork_snapshot""".split()
    )


def test_refs_resolve_and_no_fastapi_leftovers(doc) -> None:
    schemas = doc["components"]["schemas"]
    for ref in refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert not {"HTTPValidationError", "ValidationError"} & set(schemas)
    for method, path, op in operations(doc):
        assert "422" not in op["responses"], (method, path)


def test_errors_are_the_error_object(doc) -> None:
    assert doc["components"]["schemas"]["Error"] == {
        "additionalProperties": False,
        "properties": {"error": {"title": "Error", "type": "string"}},
        "required": ["error"],
        "title": "Error",
        "type": "object",
    }
    # The one error with more than its message: an exec that timed out carries its output.
    timed_out = {("POST", "/vms/{vm_id}/exec", "504"): "ExecTimedOut"}
    for method, path, op in operations(doc):
        assert "413" in op["responses"], (method, path)
        for status, response in op["responses"].items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                model = timed_out.get((method, path, status), "Error")
                assert schema == {"$ref": f"#/components/schemas/{model}"}, (method, path, status)
    assert "error" in doc["components"]["schemas"]["ExecTimedOut"]["required"]


def test_statuses_per_operation(doc) -> None:
    statuses = {op["operationId"]: sorted(op["responses"]) for _, _, op in operations(doc)}
    assert statuses["create_vm"] == ["201", "400", "401", "403", "413", "500", "503"]
    # 501: the VM's VMM driver lacks snapshots (its capabilities say so).
    assert statuses["snapshot_vm"] == [
        "201", "401", "403", "404", "409", "413", "500", "501", "503"
    ]  # fmt: skip
    assert statuses["restore_vm"] == [
        "200", "400", "401", "404", "409", "413", "500", "501", "503"
    ]  # fmt: skip
    assert statuses["delete_snapshot"] == ["200", "401", "404", "409", "413", "503"]
    assert statuses["create_route"] == ["201", "400", "401", "404", "409", "413", "500", "503"]
    assert statuses["list_vms"] == ["200", "401", "413", "503"]
    assert statuses["healthz"] == ["200", "413", "500"]
    # 501: a VMM driver without an agent channel (Firecracker).
    guest = ["400", "401", "404", "409", "413", "500", "501", "502", "503", "504"]
    assert statuses["exec_vm"] == sorted(["200", "201", *guest])
    for op in """exec_vm_stream list_processes get_process kill_process delete_process
        upload_file download_file stat_file list_files delete_file""".split():
        assert statuses[op] == sorted(["200", *guest]), op


def test_streamed_answers_and_the_raw_upload(doc) -> None:
    ops = {op["operationId"]: op for _, _, op in operations(doc)}
    assert list(ops["exec_vm_stream"]["responses"]["200"]["content"]) == ["application/x-ndjson"]
    assert list(ops["download_file"]["responses"]["200"]["content"]) == ["application/octet-stream"]
    body = ops["upload_file"]["requestBody"]
    assert body["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    assert "4294967296 bytes" in ops["upload_file"]["responses"]["413"]["description"]
    assert [p["name"] for p in ops["upload_file"]["parameters"]] == [
        "vm_id",
        "path",
        "mode",
        "parents",
    ]
    exec_201 = ops["exec_vm"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert exec_201 == {"$ref": "#/components/schemas/Process"}


def test_the_console_is_text(doc) -> None:
    op = doc["paths"]["/vms/{vm_id}/console"]["get"]
    assert list(op["responses"]["200"]["content"]) == ["text/plain"]
    assert [p["name"] for p in op["parameters"]] == ["vm_id", "lines", "follow"]


def test_metrics_are_prometheus_text(doc) -> None:
    op = doc["paths"]["/metrics"]["get"]
    assert sorted(op["responses"]) == ["200", "404", "413"]  # 404: HATCH_METRICS_ADDR is set
    assert list(op["responses"]["200"]["content"]) == ["text/plain; version=0.0.4"]
    assert "parameters" not in op and "requestBody" not in op


def test_request_bodies(doc) -> None:
    bodies = {
        op["operationId"]: op["requestBody"] for _, _, op in operations(doc) if "requestBody" in op
    }
    assert {k: v["required"] for k, v in bodies.items()} == {
        "create_vm": False,  # an empty body is {}: every field has a default
        "restore_vm": False,
        "create_route": True,  # target_port is required
        "exec_vm": True,
        "exec_vm_stream": True,
        "kill_process": False,
        "upload_file": True,
        "fork_vm": False,  # count defaults to 1
        "fork_snapshot": False,
    }
    schema = bodies["create_vm"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/VMCreate"}
    vm_create = doc["components"]["schemas"]["VMCreate"]
    assert vm_create["additionalProperties"] is False
    assert vm_create["properties"]["vcpu_count"]["anyOf"][0] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 32,
    }


def test_security(doc) -> None:
    assert doc["components"]["securitySchemes"] == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "Authorization: Bearer <key>",
        },
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    for method, path, op in operations(doc):
        public = path in ("/healthz", "/metrics")
        expected = None if public else [{"bearer": []}, {"apiKey": []}]
        assert op.get("security") == expected, (method, path)


def test_405_names_every_method_of_the_path() -> None:
    client = TestClient(create_app(None))  # type: ignore[arg-type]
    r = client.put("/vms")
    assert r.status_code == 405 and r.json() == {"error": "method not allowed"}
    assert r.headers["allow"] == "GET, POST"  # Starlette alone says "GET": the first route
    r = client.options("/vms/vm_x")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    assert client.get("/vms/vm_x/stop").headers["allow"] == "POST"


def test_links_lead_to_real_operations(doc) -> None:
    ops = {op["operationId"]: op for _, _, op in operations(doc)}
    seen = 0
    for _, _, op in operations(doc):
        for response in op["responses"].values():
            for link in response.get("links", {}).values():
                target = ops[link["operationId"]]
                params = {p["name"] for p in target.get("parameters", [])}
                assert set(link["parameters"]) == params, link
                assert ("requestBody" in link) <= ("requestBody" in target), link
                seen += 1
    assert seen >= 30
    created = ops["create_vm"]["responses"]["201"]["links"]
    assert created["stop_vm"] == {
        "operationId": "stop_vm",
        "parameters": {"vm_id": "$response.body#/id"},
    }
    restore = ops["snapshot_vm"]["responses"]["201"]["links"]["restore_vm"]
    assert restore["requestBody"] == {"snapshot_id": "$response.body#/id"}


def test_streamed_operations_are_never_linked(doc) -> None:
    """A stateful fuzzer follows links: it must never land in an answer that streams until
    the guest decides to stop."""
    targets = {
        link["operationId"]
        for _, _, op in operations(doc)
        for response in op["responses"].values()
        for link in response.get("links", {}).values()
    }
    assert not targets & {"exec_vm_stream", "download_file", "upload_file", "get_console"}


def test_a_snapshot_says_whether_it_is_stored(doc) -> None:
    schema = doc["components"]["schemas"]["Snapshot"]
    status = schema["properties"]["status"]
    assert status["enum"] == ["storing", "stored", "failed"]
    assert {"status", "status_reason", "artifacts"} <= set(schema["required"])
    reason = schema["properties"]["status_reason"]["anyOf"]
    assert {"type": "null"} in reason  # only a failed snapshot has one
    artifacts = schema["properties"]["artifacts"]["anyOf"]
    assert {"type": "null"} in artifacts  # none until stored
