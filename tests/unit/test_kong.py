"""kong/kong.yaml, checked offline (no Kong, no decK here).

* the file is valid decK/Kong declarative configuration: decK's own JSON schema
  (tests/schemas/kong-declarative.schema.json), plus a model of the documented options of
  every plugin it uses (that schema leaves plugin `config` free-form);
* Kong's routes and the OpenAPI document agree both ways, and each operation reaches the
  function that serves it, with the access rule the API documents;
* the limits, identity headers and gateway secret are wired the way the functions expect.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from werkzeug.exceptions import HTTPException

from docproc.apidoc import openapi
from docproc.registry import HTTP_FUNCTIONS
from shared.access import request_id
from shared.config import Settings
from shared.http import read_json
from shared.identity import identity_from_headers

ROOT = Path(__file__).resolve().parents[2]
KONG_FILE = ROOT / "kong" / "kong.yaml"
CONSUMERS_FILE = ROOT / "kong" / "consumers.example.yaml"
SCHEMA = json.loads((ROOT / "tests/schemas/kong-declarative.schema.json").read_text())
TAG = "docproc-gateway"
HEALTH_ROUTE = "slot-health"
CONSUMERS_TAG = "docproc-consumers"
GROUPS = {"drivers", "agents"}
# Knative Service `docproc-<function>` in namespace <ns>, reached by its cluster-local name.
KNATIVE_HOST = re.compile(
    r"docproc-(?P<function>[a-z]+)\.(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
    r"\.svc\.cluster\.local")
VAULT_REFERENCE = re.compile(r"\{vault://(?P<vault>[a-z0-9-]+)/(?P<resource>[^{}/]+)\}")


# ------------------------------------------------------------------------------ loading

class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _mapping_without_duplicates)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506
    return data


def _kong() -> dict[str, Any]:
    """A fresh copy: tests that break it on purpose must not affect the others."""
    fresh: dict[str, Any] = copy.deepcopy(_cached_kong())
    return fresh


@cache
def _cached_kong() -> dict[str, Any]:
    return _load(KONG_FILE)


# ------------------------------------------- the documented options of the plugins used
# Field names, types, defaults and checks follow Kong Gateway 3.x's plugin schemas as its
# plugin reference documents them (docs.konghq.com/hub/kong-inc/<plugin>/configuration).
# Only plugins the project uses are modelled; any other plugin name fails, so adding one
# means modelling it here first.

class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


Port = Annotated[int, Field(ge=0, le=65535)]
Timeout = Annotated[int, Field(ge=0, le=2**31 - 2)]
HttpMethod = Literal["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE",
                     "CONNECT"]
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


def _header_names(values: list[str]) -> list[str]:
    for value in values:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid header name")
    return values


def _colon_pairs(values: list[str]) -> list[str]:
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep or not name or not rest:
            raise ValueError(f"{value!r} is not a name:value pair")
    return values


class RedisOptions(_Options):
    """The `redis` record shared by Kong's Redis-backed plugins (3.x)."""

    host: str | None = None
    port: Port | None = None
    timeout: Timeout = 2000
    username: str | None = None
    password: str | None = None
    database: int = 0
    ssl: bool = False
    ssl_verify: bool = False
    server_name: str | None = None


class RateLimiting(_Options):
    second: Annotated[float, Field(gt=0)] | None = None
    minute: Annotated[float, Field(gt=0)] | None = None
    hour: Annotated[float, Field(gt=0)] | None = None
    day: Annotated[float, Field(gt=0)] | None = None
    month: Annotated[float, Field(gt=0)] | None = None
    year: Annotated[float, Field(gt=0)] | None = None
    limit_by: Literal["consumer", "consumer-group", "credential", "ip", "service", "header",
                      "path"] = "consumer"
    header_name: str | None = None
    path: str | None = None
    policy: Literal["local", "cluster", "redis"] = "local"
    fault_tolerant: bool = True
    redis: RedisOptions = RedisOptions()
    hide_client_headers: bool = False
    error_code: Annotated[float, Field(ge=0)] = 429
    error_message: str = "API rate limit exceeded"
    sync_rate: float = -1

    @model_validator(mode="after")
    def _documented_checks(self) -> RateLimiting:
        limits = [(p, getattr(self, p)) for p in PERIODS if getattr(self, p) is not None]
        if not limits:
            raise ValueError("set at least one of second, minute, hour, day, month, year")
        for (shorter, low), (longer, high) in itertools.pairwise(limits):
            if high < low:
                raise ValueError(f"the limit for {longer} cannot be lower than for {shorter}")
        if self.policy == "redis" and (self.redis.host is None or self.redis.port is None):
            raise ValueError("policy redis needs redis.host and redis.port")
        if self.limit_by == "header" and not self.header_name:
            raise ValueError("limit_by header needs header_name")
        if self.limit_by == "path" and not self.path:
            raise ValueError("limit_by path needs path")
        return self


PERIODS = ("second", "minute", "hour", "day", "month", "year")


class RequestSizeLimiting(_Options):
    allowed_payload_size: int = 128
    size_unit: Literal["megabytes", "kilobytes", "bytes"] = "megabytes"
    require_content_length: bool = False


# Kong's request-size-limiting handler: kilobytes are 2^10 bytes, megabytes 2^20.
SIZE_UNITS = {"bytes": 1, "kilobytes": 1024, "megabytes": 1024 * 1024}


class Jwt(_Options):
    uri_param_names: list[str] = ["jwt"]
    cookie_names: list[str] = []
    header_names: list[str] = ["authorization"]
    key_claim_name: str = "iss"
    secret_is_base64: bool = False
    claims_to_verify: list[Literal["exp", "nbf"]] | None = None
    anonymous: str | None = None
    run_on_preflight: bool = True
    maximum_expiration: Annotated[float, Field(ge=0, le=31536000)] = 0
    realm: str | None = None

    @model_validator(mode="after")
    def _expiry_needs_exp(self) -> Jwt:
        if self.maximum_expiration > 0 and "exp" not in (self.claims_to_verify or []):
            raise ValueError("maximum_expiration needs exp in claims_to_verify")
        return self


class Acl(_Options):
    allow: list[str] | None = None
    deny: list[str] | None = None
    hide_groups_header: bool = False
    include_consumer_groups: bool = False
    always_use_authenticated_groups: bool = False

    @model_validator(mode="after")
    def _one_list(self) -> Acl:
        if (self.allow is None) == (self.deny is None):
            raise ValueError("exactly one of allow or deny")
        return self


class Cors(_Options):
    origins: list[str] | None = None
    headers: list[str] | None = None
    exposed_headers: list[str] | None = None
    methods: list[HttpMethod] = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS",
                                 "TRACE", "CONNECT"]
    max_age: float | None = None
    credentials: bool = False
    private_network: bool = False
    preflight_continue: bool = False
    allow_origin_absent: bool = True

    @field_validator("origins")
    @classmethod
    def _origin_is_star_or_regex(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if value != "*":
                re.compile(value)
        return values

    @field_validator("headers", "exposed_headers")
    @classmethod
    def _names(cls, values: list[str] | None) -> list[str] | None:
        return None if values is None else _header_names(values)


class CorrelationId(_Options):
    header_name: str = "Kong-Request-ID"
    generator: Literal["uuid", "uuid#counter", "tracker"] = "uuid#counter"
    echo_downstream: bool = False


class _Names(_Options):
    body: list[str] = []
    headers: list[str] = []
    querystring: list[str] = []

    @field_validator("headers")
    @classmethod
    def _names(cls, values: list[str]) -> list[str]:
        return _header_names(values)


class _Pairs(_Options):
    body: list[str] = []
    headers: list[str] = []
    querystring: list[str] = []

    @field_validator("body", "headers", "querystring")
    @classmethod
    def _pairs(cls, values: list[str]) -> list[str]:
        return _colon_pairs(values)


class _PairsAndUri(_Pairs):
    uri: str | None = None


class RequestTransformer(_Options):
    http_method: Annotated[str, Field(pattern=r"^[A-Z]+$")] | None = None
    remove: _Names = _Names()
    rename: _Pairs = _Pairs()
    replace: _PairsAndUri = _PairsAndUri()
    add: _Pairs = _Pairs()
    append: _Pairs = _Pairs()


class _CacheMemory(_Options):
    dictionary_name: str = "kong_db_cache"


class _CacheResponseHeaders(_Options):
    age: bool = True
    x_cache_status: bool = Field(default=True, alias="X-Cache-Status")
    x_cache_key: bool = Field(default=True, alias="X-Cache-Key")


class ProxyCache(_Options):
    response_code: list[Annotated[int, Field(ge=100, le=900)]] = [200, 301, 404]
    request_method: list[Literal["HEAD", "GET", "POST", "PATCH", "PUT"]] = ["GET", "HEAD"]
    content_type: list[str] = ["text/plain", "application/json"]
    cache_ttl: Annotated[int, Field(gt=0)] = 300
    strategy: Literal["memory"]
    cache_control: bool = False
    ignore_uri_case: bool = False
    storage_ttl: int | None = None
    memory: _CacheMemory = _CacheMemory()
    vary_query_params: list[str] | None = None
    vary_headers: list[str] | None = None
    response_headers: _CacheResponseHeaders = _CacheResponseHeaders()


class ServerlessFunction(_Options):
    """pre-function / post-function: Lua code per phase."""

    certificate: list[str] = []
    rewrite: list[str] = []
    access: list[str] = []
    header_filter: list[str] = []
    body_filter: list[str] = []
    log: list[str] = []


PLUGIN_OPTIONS: dict[str, type[_Options]] = {
    "acl": Acl,
    "correlation-id": CorrelationId,
    "cors": Cors,
    "jwt": Jwt,
    "post-function": ServerlessFunction,
    "proxy-cache": ProxyCache,
    "rate-limiting": RateLimiting,
    "request-size-limiting": RequestSizeLimiting,
    "request-transformer": RequestTransformer,
}


def check_plugin(plugin: dict[str, Any]) -> _Options:
    name = plugin["name"]
    if name not in PLUGIN_OPTIONS:
        raise ValueError(f"plugin {name!r} has no model of its documented options")
    return PLUGIN_OPTIONS[name].model_validate(plugin.get("config", {}))


# ------------------------------------------------------------ the config, as Kong sees it

@dataclass(frozen=True)
class Route:
    name: str
    service: str
    methods: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]
    regex_priority: int
    spec: dict[str, Any]
    plugins: dict[str, dict[str, Any]]  # effective: route > service > global

    def matches(self, method: str, path: str) -> bool:
        # Kong anchors regex paths at the start; ours also end in $ (checked below)
        return method in self.methods and any(p.match(path) for p in self.patterns)

    def options(self, plugin: str) -> Any:
        return check_plugin(self.plugins[plugin])


def _by_name(plugins: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in plugins if p.get("enabled", True)}


def routes() -> list[Route]:
    doc = _cached_kong()
    found = []
    for service in doc.get("services", []):
        for spec in service.get("routes", []):
            plugins = {**_by_name(doc.get("plugins", [])),
                       **_by_name(service.get("plugins", [])),
                       **_by_name(spec.get("plugins", []))}
            found.append(Route(
                name=spec["name"], service=service["name"], methods=frozenset(spec["methods"]),
                patterns=tuple(re.compile(p.removeprefix("~")) for p in spec["paths"]),
                regex_priority=spec.get("regex_priority", 0), spec=spec, plugins=plugins))
    return found


def winner(method: str, path: str) -> Route | None:
    """The route Kong picks: among the matching ones, the highest regex_priority, which the
    config must make unambiguous."""
    matching = [r for r in routes() if r.matches(method, path)]
    if not matching:
        return None
    top = max(r.regex_priority for r in matching)
    best = [r for r in matching if r.regex_priority == top]
    assert len(best) == 1, f"{method} {path}: ambiguous between {[r.name for r in best]}"
    return best[0]


def all_plugins(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every plugin instance of the file, with where it sits."""
    for plugin in doc.get("plugins", []):
        yield "global", plugin
    for service in doc.get("services", []):
        for plugin in service.get("plugins", []):
            yield f"service {service['name']}", plugin
        for route in service.get("routes", []):
            for plugin in route.get("plugins", []):
                yield f"route {route['name']}", plugin
    for consumer in doc.get("consumers", []):
        for plugin in consumer.get("plugins", []):
            yield f"consumer {consumer.get('username')}", plugin


# ------------------------------------------------------------------ the API, from OpenAPI

@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    summary: str
    public: bool
    samples: tuple[str, ...]  # the path with sample parameter values


# Values tried for path parameters; each parameter gets those its schema accepts.
# ("me" is left out: /v1/users/me is its own operation, for users and werkzeug alike.)
SAMPLE_VALUES = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210",
                 "0123456789abcdef", "driver-7", "agent.smith@example.com",
                 "00000000-0000-4000-8000-000000000000", "u_42")


def _samples(template: str, params: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    names = re.findall(r"{(\w+)}", template)
    choices = {}
    for name in names:
        pattern = params[name].get("schema", {}).get("pattern")
        fits = [v for v in SAMPLE_VALUES if pattern is None or re.search(pattern, v)]
        assert fits, f"no sample value fits {name} ({pattern}) in {template}"
        choices[name] = fits
    count = max((len(v) for v in choices.values()), default=1)
    return tuple(template.format_map({n: v[i % len(v)] for n, v in choices.items()})
                 for i in range(count))


@cache
def operations() -> tuple[Operation, ...]:
    spec = openapi()
    ops = []
    for template, item in spec["paths"].items():
        shared = {p["name"]: p for p in item.get("parameters", []) if p["in"] == "path"}
        for method, op in item.items():
            if method == "parameters":
                continue
            params = {**shared,
                      **{p["name"]: p for p in op.get("parameters", []) if p["in"] == "path"}}
            ops.append(Operation(
                method=method.upper(), template=template, summary=op.get("summary", ""),
                public=op.get("security", spec.get("security")) == [],
                samples=_samples(template, params)))
    return tuple(ops)


def serving_function(method: str, path: str) -> str:
    """The HTTP function whose werkzeug routes take this request."""
    names = []
    for fn in HTTP_FUNCTIONS:
        try:
            fn.routes.bind("api.docproc.example").match(path, method)
        except HTTPException:
            continue
        names.append(fn.name)
    assert len(names) == 1, f"{method} {path} served by {names}"
    return names[0]


# ================================================================================= tests

def test_schema_copy_is_the_draft_it_declares() -> None:
    assert jsonschema.validators.validator_for(SCHEMA) is jsonschema.Draft4Validator
    jsonschema.Draft4Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", [KONG_FILE, CONSUMERS_FILE], ids=lambda p: p.name)
def test_file_is_valid_declarative_config(path: Path) -> None:
    doc = _load(path)
    jsonschema.Draft4Validator(SCHEMA).validate(doc)
    assert doc["_format_version"] == "3.0"


@pytest.mark.parametrize(("where", "typo"), [
    ("route", {"strip_paht": False}),
    ("service", {"read_timeut": 1000}),
    ("plugin", {"configs": {}}),
])
def test_schema_catches_a_typo(where: str, typo: dict[str, Any]) -> None:
    doc = _kong()
    service = doc["services"][0]
    target = {"route": service["routes"][0], "service": service,
              "plugin": doc["plugins"][0]}[where]
    target.update(typo)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(doc)


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        yaml.load("a: 1\na: 2\n", Loader=_StrictLoader)  # noqa: S506


@pytest.mark.parametrize("path", [KONG_FILE, CONSUMERS_FILE], ids=lambda p: p.name)
def test_every_plugin_uses_documented_options(path: Path) -> None:
    doc = _load(path)
    for where, plugin in all_plugins(doc):
        try:
            check_plugin(plugin)
        except (ValidationError, ValueError) as exc:
            pytest.fail(f"{plugin['name']} on {where}: {exc}")


def test_one_instance_of_a_plugin_per_entity() -> None:
    doc = _kong()
    entities = [doc, *doc["services"], *(r for s in doc["services"] for r in s["routes"])]
    for entity in entities:
        names = [p["name"] for p in entity.get("plugins", [])]
        assert len(names) == len(set(names)), entity.get("name", "global")


def _upload_limit(config: dict[str, Any]) -> dict[str, Any]:
    doc = _kong()
    route = next(r for s in doc["services"] for r in s["routes"]
                 if r["name"] == "documents-upload")
    plugin: dict[str, Any] = next(p for p in route["plugins"]
                                  if p["name"] == "request-size-limiting")
    plugin["config"] = config
    return plugin


@pytest.mark.parametrize(("plugin", "config"), [
    ("request-size-limiting", {"allowed_payload_sise": 50, "size_unit": "megabytes"}),
    ("request-size-limiting", {"allowed_payload_size": "50"}),
    ("request-size-limiting", {"allowed_payload_size": 50, "size_unit": "mebibytes"}),
    ("rate-limiting", {"minute": 10, "policy": "redis", "redis_hots": "redis"}),
    ("rate-limiting", {"minute": 10, "policy": "redis", "redis": {"hots": "redis", "port": 1}}),
    ("rate-limiting", {"minute": 10, "policy": "redis"}),
    ("rate-limiting", {"minute": 100, "hour": 10}),
    ("rate-limiting", {"policy": "local"}),
    ("cors", {"origins": ["https://a.example"], "methods": ["FETCH"]}),
    ("cors", {"origins": ["https://a.example"], "exposed_headers": ["Content Range"]}),
    ("jwt", {"maximum_expiration": 60}),
    ("jwt", {"claims_to_verify": ["iat"]}),
    ("acl", {"allow": ["agents"], "hide_groups_headers": False}),
    ("acl", {"allow": ["agents"], "deny": ["drivers"]}),
    ("correlation-id", {"header_name": "X-Request-ID", "generator": "uuid4"}),
    ("request-transformer", {"add": {"headers": ["X-Gateway-Secret"]}}),
    ("post-function", {"functions": ["return function() end"]}),
    ("key-auth", {}),
])
def test_plugin_models_reject_what_kong_would(plugin: str, config: dict[str, Any]) -> None:
    with pytest.raises((ValidationError, ValueError)):
        check_plugin({"name": plugin, "config": config})


def test_typo_in_the_upload_limit_is_caught() -> None:
    plugin = _upload_limit({"allowed_payload_sise": 50, "size_unit": "megabytes"})
    with pytest.raises(ValidationError, match="allowed_payload_sise"):
        check_plugin(plugin)


# ---------------------------------------------------------------------- routes vs OpenAPI

def test_routes_are_kong3_regex_paths() -> None:
    for service in _kong()["services"]:
        for route in service["routes"]:
            assert route["strip_path"] is False, route["name"]
            # Knative routes on the Host header: it must be the upstream's, not the client's
            assert route["preserve_host"] is False, route["name"]
            for path in route["paths"]:
                if route["name"] != HEALTH_ROUTE:
                    assert path.startswith("~/v1/"), (route["name"], path)
                # unanchored at the end, a Kong regex path also matches longer paths
                assert path.endswith("$"), (route["name"], path)
                re.compile(path[1:])


def test_every_operation_reaches_the_function_that_serves_it() -> None:
    for op in operations():
        for path in op.samples:
            route = winner(op.method, path)
            assert route is not None, f"no Kong route for {op.method} {path}"
            assert route.service == f"docproc-{serving_function(op.method, path)}", (
                op.method, path, route.name)


def test_every_route_serves_an_operation() -> None:
    for route in routes():
        if route.name == HEALTH_ROUTE:
            continue  # the load balancer's, not the API's: test_route53_checks_each_slot...
        for pattern in route.patterns:
            for method in route.methods - {"OPTIONS"}:
                served = [op for op in operations() if op.method == method
                          and any(pattern.match(p) and winner(method, p) == route
                                  for p in op.samples)]
                assert served, f"route {route.name}: {method} {pattern.pattern} serves nothing"


def test_every_path_answers_preflights() -> None:
    for op in operations():
        for path in op.samples:
            assert winner("OPTIONS", path) is not None, f"no preflight route for {path}"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/healthz"), ("GET", "/healthz/x"),
    ("GET", "/v1/healthz"),
    ("GET", "/v1/documents/not-a-document-id"),
    ("GET", "/v1/documents/0123456789abcdef0123456789abcdef/link"),
    ("GET", "/v1/documents/0123456789abcdef0123456789abcdef/extra"),
    ("PUT", "/v1/documents/0123456789abcdef0123456789abcdef"),
    ("POST", "/v1/files/0123456789abcdef0123456789abcdef"),
    ("GET", "/v1/files/0123456789ABCDEF0123456789ABCDEF"),
    ("DELETE", "/v1/users/me/devices"),
    ("GET", "/v1/openapi.json/x"), ("GET", "/v1/openapiXjson"),
    ("GET", "/v2/documents"), ("GET", "/v1/documents/"),
])
def test_nothing_else_is_routed(method: str, path: str) -> None:
    assert winner(method, path) is None


def test_route53_checks_each_slot_through_kong_without_credentials() -> None:
    """Route 53 fails over when the active slot's health check fails; a path Kong does not
    route answers 404 in both slots, and failover would never happen."""
    from docproc.health import PATHS, respond

    path = yaml.safe_load((ROOT / "knative" / "route53.yaml").read_text())["health_check_path"]
    route = winner("GET", path)
    assert route is not None, f"Kong does not route {path}"
    assert route.name == HEALTH_ROUTE
    assert route.methods == {"GET"}
    assert not {"jwt", "acl"} & route.plugins.keys()
    assert route.options("rate-limiting").limit_by == "ip"
    assert route.service in {f"docproc-{fn.name}" for fn in HTTP_FUNCTIONS}
    # Every HTTP function answers it before any gateway or identity check, from no service:
    # it is the liveness answer, not readiness (which reaches MongoDB, shared by both slots).
    assert path == "/healthz"
    assert path in PATHS
    answer = respond(None, path, needs_broker=False)  # type: ignore[arg-type]
    assert (answer.status_code, answer.get_json()) == (200, {"status": "ok"})


def test_users_me_is_not_taken_for_a_user_id() -> None:
    route = winner("GET", "/v1/users/me")
    assert route is not None
    assert route.name == "users-me"


# -------------------------------------------------------------------- who may call what

def test_access_follows_the_api() -> None:
    agents_only = {(op.method, op.template) for op in operations()
                   if op.summary.endswith("(agents)")}
    assert ("GET", "/v1/audit") in agents_only
    assert ("GET", "/v1/users") in agents_only
    for op in operations():
        for path in op.samples:
            route = winner(op.method, path)
            assert route is not None
            if op.public:
                assert not {"jwt", "acl"} & route.plugins.keys(), route.name
                continue
            assert {"jwt", "acl"} <= route.plugins.keys(), route.name
            acl: Acl = route.options("acl")
            assert not acl.hide_groups_header, route.name  # the functions need the groups
            expected = {"agents"} if (op.method, op.template) in agents_only else GROUPS
            assert set(acl.allow or ()) == expected, (route.name, op.method, op.template)


def test_jwt_is_the_idp_token_per_consumer() -> None:
    for route in routes():
        if "jwt" not in route.plugins:
            continue
        jwt: Jwt = route.options("jwt")
        assert jwt.key_claim_name == "sub", route.name  # one credential per IdP subject
        assert jwt.uri_param_names == [], route.name  # no ?jwt=: links end up in logs
        assert jwt.cookie_names == [], route.name
        assert jwt.claims_to_verify is not None
        assert "exp" in jwt.claims_to_verify
        assert 0 < jwt.maximum_expiration <= 3600, route.name
        assert jwt.anonymous is None, route.name


def test_functions_accept_the_identity_kong_forwards() -> None:
    # the ACL plugin joins a consumer's groups with ", "
    ident = identity_from_headers({"X-Consumer-Username": "idp-subject-1",
                                   "X-Consumer-Groups": "drivers, agents"})
    assert ident.user_id == "idp-subject-1"
    assert ident.is_agent


# ------------------------------------------------------------------------------- limits

def _payload_limit(route: Route) -> int:
    options: RequestSizeLimiting = route.options("request-size-limiting")
    return options.allowed_payload_size * SIZE_UNITS[options.size_unit]


def test_upload_limit_is_docproc_max_upload_bytes_with_multipart_framing() -> None:
    from functions.documents.upload import MULTIPART_FRAMING

    route = winner("POST", "/v1/documents")
    assert route is not None
    assert _payload_limit(route) == (Settings.model_fields["max_upload_bytes"].default
                                     + MULTIPART_FRAMING)
    options: RequestSizeLimiting = route.options("request-size-limiting")
    assert options.require_content_length  # or Kong would read a chunked body whole first
    assert route.spec["request_buffering"] is False  # streamed, never spooled by Kong


def test_other_bodies_are_limited_like_the_functions_json() -> None:
    json_limit = inspect.signature(read_json).parameters["limit"].default
    upload = winner("POST", "/v1/documents")
    for route in routes():
        if route != upload:
            assert _payload_limit(route) == json_limit, route.name


def test_every_route_is_rate_limited_in_redis() -> None:
    for route in routes():
        limits: RateLimiting = route.options("rate-limiting")
        assert limits.policy == "redis", route.name
        assert limits.redis.host, route.name
        assert limits.redis.port, route.name
        # The installation's Redis is ElastiCache with TLS and an auth token (the functions'
        # REDIS_URL is rediss://:<token>@...): without them Kong's fault-tolerant limits
        # would quietly count nothing.
        assert (limits.redis.ssl, limits.redis.ssl_verify) == (True, True), route.name
        assert limits.redis.server_name == limits.redis.host, route.name
        assert limits.redis.password is not None, route.name
        assert VAULT_REFERENCE.fullmatch(limits.redis.password), route.name
        assert not limits.redis.host.endswith(".svc.cluster.local"), route.name
        public = "jwt" not in route.plugins
        assert limits.limit_by == ("ip" if public else "consumer"), route.name


def test_uploads_have_a_limit_of_their_own() -> None:
    upload = winner("POST", "/v1/documents")
    read = winner("GET", "/v1/documents")
    assert upload is not None
    assert read is not None
    up: RateLimiting = upload.options("rate-limiting")
    reads: RateLimiting = read.options("rate-limiting")
    assert up.minute is not None
    assert reads.minute is not None
    assert up.minute < reads.minute
    assert upload.plugins["rate-limiting"] is not read.plugins["rate-limiting"]


def test_timeouts_fit_large_transfers() -> None:
    services = {s["name"]: s for s in _kong()["services"]}
    for name in ("docproc-documents", "docproc-download"):
        assert services[name]["read_timeout"] >= 300_000, name
        assert services[name]["write_timeout"] >= 300_000, name
    route = winner("GET", "/v1/files/0123456789abcdef0123456789abcdef")
    assert route is not None
    assert route.spec["response_buffering"] is False


def test_downloads_and_private_answers_are_never_cached() -> None:
    for route in routes():
        if "proxy-cache" in route.plugins:
            assert "jwt" not in route.plugins, route.name
            assert route.service != "docproc-download", route.name


# ---------------------------------------------------------------- headers for functions

def test_correlation_id_is_what_the_audit_trail_reads() -> None:
    options = check_plugin(next(p for p in _kong()["plugins"] if p["name"] == "correlation-id"))
    assert isinstance(options, CorrelationId)
    assert (options.header_name, options.generator, options.echo_downstream) == (
        "X-Request-ID", "uuid", True)
    assert request_id({options.header_name: "3f1c9d2e-req"}) == "3f1c9d2e-req"


def test_cors_serves_the_desktop_app() -> None:
    options = check_plugin(next(p for p in _kong()["plugins"] if p["name"] == "cors"))
    assert isinstance(options, Cors)
    assert options.origins
    assert "*" not in options.origins
    assert {"Idempotency-Key", "X-Filename", "X-Document-Kind", "Range", "If-None-Match",
            "Authorization", "Content-Type"} <= set(options.headers or ())
    assert {"Location", "ETag", "Content-Range"} <= set(options.exposed_headers or ())
    api_methods = {op.method for op in operations()} | {"OPTIONS"}
    assert set(options.methods) == api_methods


def test_gateway_secret_comes_from_the_vault_on_every_route() -> None:
    doc = _kong()
    env_name = Settings.model_fields["gateway_secret"].validation_alias
    assert env_name == "DOCPROC_GATEWAY_SECRET"
    plugin = next(p for p in doc["plugins"] if p["name"] == "post-function")
    code = "\n".join(check_plugin(plugin).model_dump()["access"])
    references = VAULT_REFERENCE.findall(code)
    assert len(references) == 1
    vault, resource = references[0]
    # Kong's env vault reads the variable named by the resource, upper-cased, - as _
    assert (vault, resource.replace("-", "_").upper()) == ("env", env_name)
    assert 'set_header("X-Gateway-Secret", secret)' in code
    assert 'clear_header("X-Gateway-Secret")' in code  # never a client's value
    for route in routes():
        assert route.plugins["post-function"] == plugin, route.name


def test_request_transformer_never_carries_the_secret() -> None:
    # Kong OSS does not resolve vault references in request-transformer's header values:
    # "X-Gateway-Secret:{vault://...}" would send the reference text itself
    for where, plugin in all_plugins(_kong()):
        if plugin["name"] == "request-transformer":
            options = check_plugin(plugin)
            assert isinstance(options, RequestTransformer)
            for pairs in (options.add, options.append, options.replace, options.rename):
                for header in pairs.headers:
                    assert not header.lower().startswith("x-gateway-secret"), where


SECRET_KEYS = {"password", "secret", "key", "rsa_public_key", "client_secret", "token",
               "api_key", "apikey"}
CREDENTIALS = {"jwt_secrets", "keyauth_credentials", "basicauth_credentials",
               "hmacauth_credentials", "oauth2_credentials", "mtls_auth_credentials"}
# DOCPROC_GATEWAY_SECRET must be at least 16 characters (shared/config.py)
SECRET_SIZED = re.compile(r"\S{16,}")


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def secret_literals(text: str, doc: dict[str, Any]) -> list[str]:
    """Where a config file would carry a secret in clear: an X-Gateway-Secret header value,
    credentials, secret-named options that are not vault references, a secret-sized string
    literal in serverless Lua code."""
    found = []
    if re.search(r"X-Gateway-Secret\s*:\s*(?!\{vault://)\S", text, re.IGNORECASE):
        found.append("an X-Gateway-Secret header value")
    for where, value in _walk(doc):
        key = where.rsplit(".", 1)[-1]
        if key in CREDENTIALS:
            found.append(f"{where} (credentials are provisioned by ops)")
        elif key.lower() in SECRET_KEYS and value is not None and not (
                isinstance(value, str) and VAULT_REFERENCE.fullmatch(value)):
            found.append(f"{where} (not a vault reference)")
    for where, plugin in all_plugins(doc):
        if plugin["name"] in ("pre-function", "post-function"):
            for phase, chunks in plugin.get("config", {}).items():
                for _, literal in re.findall(r"""(["'])(.*?)\1""", "\n".join(chunks)):
                    if (SECRET_SIZED.fullmatch(literal) and literal != "X-Gateway-Secret"
                            and not VAULT_REFERENCE.fullmatch(literal)):
                        found.append(f"{plugin['name']} on {where}, {phase}: {literal!r}")
    return found


@pytest.mark.parametrize("path", [KONG_FILE, CONSUMERS_FILE], ids=lambda p: p.name)
def test_no_secret_literals(path: Path) -> None:
    assert secret_literals(path.read_text(), _load(path)) == []


def _leak_header(doc: dict[str, Any]) -> None:
    route = next(r for r in doc["services"][0]["routes"] if r["name"] == "api-descriptions")
    transformer = next(p for p in route["plugins"] if p["name"] == "request-transformer")
    transformer["config"]["add"] = {"headers": ["X-Gateway-Secret:0123456789abcdef0123"]}


def _leak_redis_password(doc: dict[str, Any]) -> None:
    limits = next(p for p in doc["plugins"] if p["name"] == "rate-limiting")
    limits["config"]["redis"] = {**limits["config"]["redis"], "password": "hunter2hunter2"}


def _leak_in_lua(doc: dict[str, Any]) -> None:
    function = next(p for p in doc["plugins"] if p["name"] == "post-function")
    function["config"]["access"] = [function["config"]["access"][0].replace(
        "{vault://env/DOCPROC_GATEWAY_SECRET}", "0123456789abcdef0123")]


def _leak_credential(doc: dict[str, Any]) -> None:
    doc["consumers"] = [{"username": "someone", "keyauth_credentials": [{"key": "abc"}]}]


@pytest.mark.parametrize("leak", [_leak_header, _leak_redis_password, _leak_in_lua,
                                  _leak_credential])
def test_the_secret_scan_finds_literals(leak: Any) -> None:
    doc = _kong()
    leak(doc)
    assert secret_literals(yaml.safe_dump(doc, sort_keys=False), doc)


# -------------------------------------------------------------------------- the services

def test_one_service_per_http_function_at_its_knative_service() -> None:
    services = {s["name"]: s for s in _kong()["services"]}
    assert set(services) == {f"docproc-{fn.name}" for fn in HTTP_FUNCTIONS}
    namespaces = set()
    for fn in HTTP_FUNCTIONS:
        service = services[f"docproc-{fn.name}"]
        match = KNATIVE_HOST.fullmatch(service["host"])
        assert match is not None, service["host"]
        assert match["function"] == fn.name
        namespaces.add(match["namespace"])
        assert (service["protocol"], service["port"]) == ("http", 80)
        assert "url" not in service
        assert "path" not in service
        func = yaml.safe_load((ROOT / "functions" / fn.name / "func.yaml").read_text())
        assert func["name"] == service["name"]  # the Knative Service's name
    assert len(namespaces) == 1


SLOTS = ("odd", "even")
_SERVICE_SELECTOR = re.compile(r"\$\.\.services\[\?\(@\.name=='(?P<name>[a-z-]+)'\)\]")


def _patched(slot: str) -> dict[str, Any]:
    """kong.yaml with kong/slots/<slot>.yaml applied as `deck file patch` would: each
    selector picks a service by name, and its values overwrite that service's fields."""
    patch = _load(ROOT / "kong" / "slots" / f"{slot}.yaml")
    assert set(patch) == {"_format_version", "patches"}
    assert patch["_format_version"] == "1.0"
    doc = _kong()
    services = {s["name"]: s for s in doc["services"]}
    for entry in patch["patches"]:
        assert set(entry) == {"selectors", "values"}
        for selector in entry["selectors"]:
            match = _SERVICE_SELECTOR.fullmatch(selector)
            assert match is not None, selector
            services[match["name"]].update(entry["values"])
    return doc


@pytest.mark.parametrize("slot", SLOTS)
def test_each_slot_proxies_to_its_own_namespace_and_changes_nothing_else(slot: str) -> None:
    """Every slot's Kong sends each route to that slot's Knative Service: the base file's
    namespace exists in neither slot, so applied alone every route would answer 503."""
    overlay = yaml.safe_load((ROOT / "knative" / "overlays" / slot / "kustomization.yaml")
                             .read_text())
    doc = _patched(slot)
    jsonschema.Draft4Validator(SCHEMA).validate(doc)
    base = _kong()
    for service, before in zip(doc["services"], base["services"], strict=True):
        match = KNATIVE_HOST.fullmatch(service["host"])
        assert match is not None, service["host"]
        assert match["namespace"] == overlay["namespace"] == f"docproc-{slot}"
        assert match["function"] == service["name"].removeprefix("docproc-")
        assert {k: v for k, v in service.items() if k != "host"} == {
            k: v for k, v in before.items() if k != "host"}
    assert {k: v for k, v in doc.items() if k != "services"} == {
        k: v for k, v in base.items() if k != "services"}


def test_every_entity_is_tagged_for_select_tag_sync() -> None:
    doc = _kong()
    assert "consumers" not in doc  # provisioned by ops, under their own tag
    for where, plugin in all_plugins(doc):
        assert TAG in plugin.get("tags", []), where
    for service in doc["services"]:
        assert TAG in service.get("tags", []), service["name"]
        for route in service["routes"]:
            assert TAG in route.get("tags", []), route["name"]


def test_example_consumers_show_the_groups_without_credentials() -> None:
    doc = _load(CONSUMERS_FILE)
    groups = []
    for consumer in doc["consumers"]:
        assert CONSUMERS_TAG in consumer["tags"]
        assert TAG not in consumer["tags"]
        assert not CREDENTIALS & consumer.keys(), consumer["username"]
        assert len(consumer["acls"]) == 1, consumer["username"]
        groups.append(consumer["acls"][0]["group"])
    assert sorted(groups) == sorted(GROUPS)
