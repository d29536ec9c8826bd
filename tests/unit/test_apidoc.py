"""The API descriptions match the code: one OpenAPI operation per route and back, schemas
from the models the handlers use, and the committed copies in docs/ up to date."""

from __future__ import annotations

import json
import re
from pathlib import Path

from docproc.apidoc import asyncapi, openapi
from docproc.registry import HTTP_FUNCTIONS
from events.catalog import MODELS

ROOT = Path(__file__).resolve().parents[2]
SERVER = "https://api.docproc.example"


def _routes() -> set[tuple[str, str]]:
    found = set()
    for fn in HTTP_FUNCTIONS:
        for rule in fn.routes.iter_rules():
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            for method in rule.methods or ():
                if method not in ("HEAD", "OPTIONS"):
                    found.add((method.lower(), path))
    return found


def test_every_route_is_described_and_every_operation_routed() -> None:
    described = {(method, path) for path, item in openapi()["paths"].items()
                 for method in item if method != "parameters"}
    assert described == _routes()


def test_path_parameters_are_declared() -> None:
    for path, item in openapi()["paths"].items():
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path


def test_every_referenced_schema_exists() -> None:
    doc = openapi()
    text = json.dumps(doc)
    for name in re.findall(r'"#/components/schemas/(\w+)"', text):
        assert name in doc["components"]["schemas"], name


def test_asyncapi_carries_every_event_with_its_model_schema() -> None:
    doc = asyncapi()
    assert {c["address"] for c in doc["channels"].values()} == set(MODELS)
    for model in MODELS.values():
        schema = doc["components"]["schemas"][model.__name__]
        assert set(schema["properties"]) == set(model.model_fields)


def test_committed_documents_are_current() -> None:
    for name, doc in (("openapi.json", openapi(SERVER)), ("asyncapi.json", asyncapi())):
        committed = json.loads((ROOT / "docs" / name).read_text())
        assert committed == json.loads(json.dumps(doc)), (
            f"docs/{name} is stale: run `docproc apidoc`")
