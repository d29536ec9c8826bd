"""Schema-driven fuzzing: schemathesis sends generated, malformed and hostile requests to
every operation of the OpenAPI document, as a driver, against the real pipeline. No answer
may be a 5xx, and none may reveal anything of another driver's documents."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from docproc.apidoc import openapi
from tests import samples
from tests.conftest import Running
from tests.helpers import DRIVER, OTHER_DRIVER, settled, upload

pytestmark = pytest.mark.services


@pytest.fixture
def victim(running: Running) -> dict[str, Any]:
    """Another driver's stored document, with a marker in it, that the fuzzer must not reach."""
    with requests.Session() as http:
        mark = samples.marker()
        http.post(running.url("/v1/users/me/devices"), headers=OTHER_DRIVER,
                  json={"token": "victim-token", "platform": "ios"})
        doc_id = upload(http, running.base_url, samples.pdf(mark), "application/pdf",
                        headers=OTHER_DRIVER).json()["id"]
        doc = settled(http, running.base_url, doc_id, headers=OTHER_DRIVER)
    return {"doc": doc, "marker": mark.decode()}


# Document bodies are bytes whatever their type; fuzz them as such.
schemathesis.serializer.alias(["application/pdf", "image/tiff", "image/heic"],
                              "application/octet-stream")

# The document the function serves (checked below); its server URL is replaced per call.
schema = schemathesis.openapi.from_dict(openapi())


def test_the_served_document_is_the_fuzzed_one(running: Running) -> None:
    served = requests.get(running.url("/v1/openapi.json"), timeout=10)
    assert served.status_code == 200
    assert served.json() == openapi(running.base_url)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_no_leaks(case: Any, running: Running,
                                       victim: dict[str, Any]) -> None:
    victim_id = victim["doc"]["id"]
    params = case.path_parameters or {}
    if "doc_id" in params and params["doc_id"][:1] in "01234567":
        params["doc_id"] = victim_id  # half the time, aim at the other driver's document
    if "user_id" in params and params["user_id"][:1] in "abcdefgh":
        params["user_id"] = "driver-2"
    if case.path == "/v1/files/{doc_id}" and params.get("doc_id") == victim_id:
        # the victim's real link: signature valid, but the caller is not its owner
        link = victim["doc"]["download_url"].split("?", 1)[1]
        case.query = dict(p.split("=", 1) for p in link.split("&"))
    case.headers = {**(case.headers or {}), **DRIVER}
    response = case.call(base_url=running.base_url, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
    text = response.text
    for secret in (victim_id, victim["marker"], "driver-2", "victim-token"):
        if secret == "driver-2" and case.path == "/v1/users/{user_id}":
            continue  # the 404/403 answer may echo the id asked for; it says nothing else
        assert secret not in text, (case.method, case.formatted_path, response.status_code)
