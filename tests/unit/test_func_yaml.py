"""Every function folder carries a func.yaml that the Knative `func` CLI accepts, naming a
target that exists, and subscribing to exactly the events the routing table gives it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from events.subscriptions import ROUTES

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests/schemas/func-yaml.schema.json").read_text())
FUNCTIONS = sorted(p.parent.name for p in (ROOT / "functions").glob("*/main.py"))


class _TextLoader(yaml.SafeLoader):
    """Reads timestamps as the strings the schema (and func's Go decoder) expects."""


_TextLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load(name: str) -> dict[str, Any]:
    text = (ROOT / "functions" / name / "func.yaml").read_text()
    data: dict[str, Any] = yaml.load(text, Loader=_TextLoader)  # noqa: S506 - a safe loader
    return data


def _env(spec: dict[str, Any], name: str) -> str:
    return str(next(e["value"] for e in spec["build"]["buildEnvs"] if e["name"] == name))


def test_every_function_has_a_folder() -> None:
    assert FUNCTIONS == ["documents", "download", "notification", "storage", "users"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_func_yaml_is_valid_for_the_func_cli(name: str) -> None:
    spec = _load(name)
    jsonschema.Draft4Validator(SCHEMA).validate(spec)
    assert spec["name"] == f"docproc-{name}"
    assert spec["build"]["builder"] == "pack"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_func_yaml_target_exists_with_its_signature(name: str) -> None:
    spec = _load(name)
    module = importlib.import_module(f"functions.{name}.main")
    target = _env(spec, "GOOGLE_FUNCTION_TARGET")
    assert callable(getattr(module, target))
    assert _env(spec, "GOOGLE_FUNCTION_SIGNATURE_TYPE") == spec["invoke"]
    subscribed = {s["filters"]["type"] for s in spec["deploy"].get("subscriptions", [])}
    assert subscribed == set(ROUTES.get(name, ()))
    assert (spec["invoke"] == "cloudevent") == (name in ROUTES)


def test_schema_catches_a_typo() -> None:
    spec = _load("storage")
    spec["build"]["bulider"] = "pack"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(spec)
