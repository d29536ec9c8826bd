"""The image's entrypoint runs the functions: no container engine exists here, so the test
reads the Containerfile's final stage (ARG, ENV, WORKDIR, USER, CMD/ENTRYPOINT), builds the
command line and environment exactly as the container gets them (build arguments, or the
variables a Knative Service sets at run time), and runs that command from the repository
root, which stands in for the image's /app, against the test services. The image's paths map
to this machine: /opt/venv to the virtualenv, the volumes (/var/tmp, /mnt/efs) to temporary
directories; everything else of the image is read-only, so nothing may need to write there.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
import pytest
import requests
import yaml

from shared.config import Settings
from tests.processes import ROOT, process, settings_env
from tests.services import free_port

pytestmark = pytest.mark.services

CONTAINERFILE = ROOT / "Containerfile"
VENV = Path(sys.executable).parent.parent
# The image's writable places: volumes in Kubernetes (knative/base/functions/*.yaml).
VOLUMES = ("/var/tmp", "/mnt/efs")


@dataclass
class Stage:
    base: str
    args: dict[str, str | None] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    copies: list[list[str]] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def _substitute(value: str, scope: dict[str, str]) -> str:
    """Dockerfile variable syntax: $VAR, ${VAR}, ${VAR:-default}."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        found = scope.get(name, "")
        return found if found or default is None else default

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, value)


def parse(build_args: dict[str, str], base_path: str) -> tuple[Stage, dict[str, str]]:
    """The final stage of the Containerfile and its environment, as built with
    ``build_args``. ``base_path`` stands for the base image's PATH."""
    global_args: dict[str, str | None] = {}
    stage: Stage | None = None
    for word, rest in _instructions(CONTAINERFILE.read_text()):
        if word == "ARG":
            name, eq, default = rest.partition("=")
            target = stage.args if stage is not None else global_args
            target[name] = build_args.get(name, default if eq else None)
        elif word == "FROM":
            scope = {k: v for k, v in global_args.items() if v is not None}
            stage = Stage(base=_substitute(rest.split()[0], scope))
        elif stage is None:
            raise AssertionError(f"{word} before FROM")
        elif word == "ENV":
            scope = {"PATH": base_path, **{k: v for k, v in stage.args.items() if v},
                     **stage.env}
            # All pairs of one ENV see the environment from before it.
            pairs = [t.partition("=") for t in shlex.split(rest)]
            stage.env.update({k: _substitute(v, scope) for k, _, v in pairs})
        elif word == "WORKDIR":
            stage.workdir = rest
        elif word == "USER":
            stage.user = rest
        elif word in ("CMD", "ENTRYPOINT"):
            form = json.loads(rest)  # exec form only: a shell form would hide the process
            assert isinstance(form, list)
            setattr(stage, word.lower(), [str(x) for x in form])
        elif word == "COPY":
            stage.copies.append(rest.split())
    assert stage is not None
    env = {"PATH": base_path, **stage.env}
    return stage, env


def to_host(value: str, volumes: dict[str, Path]) -> str:
    """An image path in a variable, as this machine has it."""
    places = {"/opt/venv": VENV, "/app": ROOT, **volumes}
    for image_path, here in places.items():
        value = re.sub(rf"(?<![\w/]){re.escape(image_path)}(?=/|:|$)", str(here), value)
    return value


def knative_env(name: str) -> dict[str, str]:
    """The plain variables a Knative Service sets for its container."""
    doc = yaml.safe_load((ROOT / "knative" / "base" / "functions" / f"{name}.yaml").read_text())
    [c] = doc["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def container_process(settings: Settings, tmp: Path, build_args: dict[str, str],
                      runtime_env: dict[str, str]) -> tuple[list[str], dict[str, str], int]:
    """argv, environment and port of the container, as Kubernetes would start it."""
    services = settings_env(settings)
    stage, image_env = parse(build_args, os.environ.get("PATH", "/usr/bin:/bin"))
    assert stage.workdir == "/app"
    volumes = {v: tmp / v.strip("/").replace("/", "-") for v in VOLUMES}
    for path in volumes.values():
        path.mkdir(parents=True, exist_ok=True)
    image_env = {k: to_host(v, volumes) for k, v in image_env.items()}
    for key in ("TMPDIR", "DOCPROC_DATA_DIR", "EFS_ROOT"):
        assert any(image_env[key].startswith(str(p)) for p in volumes.values()), key
    configured = {k: v for k, v in services.items() if os.environ.get(k) != v}
    port = free_port()
    env = {**services, **image_env, **configured, **runtime_env,
           # What Knative sets; HOST keeps the test server on loopback.
           "PORT": str(port), "HOST": "127.0.0.1"}
    argv = (stage.entrypoint or []) + (stage.cmd or [])
    assert argv, "the image has neither ENTRYPOINT nor CMD"
    return argv, env, port


@pytest.fixture
def container(service_settings: Callable[..., Settings], tmp_path: Path
              ) -> Callable[..., tuple[str, Any, Settings]]:
    settings = service_settings()

    def start(build_args: dict[str, str], runtime_env: dict[str, str], log: str
              ) -> tuple[str, Any, Settings]:
        argv, env, port = container_process(settings, tmp_path, build_args, runtime_env)
        base = f"http://127.0.0.1:{port}"
        return base, process(argv, env, ready_url=base + "/healthz",
                             log=tmp_path / f"{log}.log"), settings

    return start


def _assert_probes_answer(base: str) -> None:
    live = requests.get(base + "/healthz", timeout=10)
    assert live.status_code == 200, live.text
    ready = requests.get(base + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"


def test_http_function_chosen_by_build_args(container: Callable[..., Any]) -> None:
    base, proc, _ = container({"FUNCTION": "documents", "TARGET": "documents",
                               "SIGNATURE_TYPE": "http"}, {}, "documents")
    with proc:
        _assert_probes_answer(base)
        # It is the documents function: its own route answers (401: no Kong identity).
        resp = requests.get(base + "/v1/documents", timeout=10)
        assert resp.status_code == 401, resp.text


def test_event_function_chosen_by_the_knative_service_env(
        container: Callable[..., Any]) -> None:
    env = knative_env("storage")
    assert env["FUNCTION"] == "storage"
    base, proc, settings = container({}, env, "storage")
    event_id = uuid.uuid4().hex
    with proc:
        _assert_probes_answer(base)
        # A CloudEvent function: an event without valid data is refused with 400.
        resp = requests.post(base + "/", data=b"{}", timeout=10, headers={
            "ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/t",
            "ce-type": "io.docproc.document.uploaded", "Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
    # eventing-rabbitmq acks a 400 and never dead-letters it: the function kept it itself.
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(settings.mongodb_uri)
    try:
        [row] = client[settings.mongodb_database]["knative_dead_letters"].find()
    finally:
        client.close()
    assert row["_id"] == f"storage:{event_id}"
    assert (row["function"], row["error_code"], row["deliveries"]) == ("storage", "400", 1)
    assert "document.uploaded" in row["event"]["type"]
    assert row["error"]


def test_dead_letter_sink_records_what_knative_gave_up_on(
        container: Callable[..., Any]) -> None:
    base, proc, settings = container({}, knative_env("dead-letters"), "dead-letters")
    event_id = uuid.uuid4().hex
    headers = {
        "ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/docproc",
        "ce-type": "io.docproc.document.stored", "ce-subject": "d" * 32,
        "ce-knativeerrorcode": "500",
        "ce-knativeerrordest": "http://docproc-notification.docproc-odd.svc.cluster.local",
        "ce-knativeerrordata": base64.b64encode(b'{"error": "FCM down"}').decode(),
        "Content-Type": "application/json"}
    body = json.dumps({"download_url": "https://api.example/v1/files/x?sig=secret"})
    with proc:
        _assert_probes_answer(base)
        for _ in range(2):  # a redelivered dead letter is counted, not duplicated
            resp = requests.post(base + "/notification", data=body, headers=headers,
                                 timeout=10)
            assert resp.status_code == 200, resp.text
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(settings.mongodb_uri)
    try:
        rows = list(client[settings.mongodb_database]["knative_dead_letters"].find())
    finally:
        client.close()
    assert len(rows) == 1
    [row] = rows
    assert row["_id"] == f"notification:{event_id}"
    assert row["function"] == "notification"
    assert row["deliveries"] == 2
    assert row["error_code"] == "500"
    assert row["error"] == '{"error": "FCM down"}'
    assert row["event"]["subject"] == "d" * 32
    # The data (here a download link) is not kept: docproc stores links only sealed.
    assert "secret" not in json.dumps(row, default=str)


# -- the Containerfile itself ----------------------------------------------------------------


def test_image_is_pinned_slim_python_and_runs_as_a_user() -> None:
    stage, env = parse({}, "/usr/bin")
    image, _, tag = stage.base.rpartition(":")
    assert image.endswith("python"), stage.base
    assert re.fullmatch(r"3\.11(\.\d+)?-slim(-\w+)?", tag), stage.base
    assert stage.user is not None
    uid = stage.user.split(":")[0]
    assert uid.isdigit(), "a numeric user: runAsNonRoot cannot check a name"
    assert int(uid) != 0
    assert stage.cmd is not None
    assert stage.entrypoint is None
    script = stage.cmd[-1]
    for option in ("--source", "--target", "--signature-type", "--port"):
        assert option in script
    assert script.startswith("exec functions-framework"), "PID 1 must be the server"
    assert env["FUNCTION"] == "documents"


def test_dockerignore_lets_through_what_the_image_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the context starts from nothing (no .venv, .git, tests)"
    stage, _ = parse({}, "/usr/bin")
    build_copies = [c for word, rest in _instructions(CONTAINERFILE.read_text())
                    if word == "COPY" for c in [rest.split()]]
    for parts in build_copies:
        if any(p.startswith("--from") for p in parts):
            continue
        for source in parts[:-1]:
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    assert stage.copies
