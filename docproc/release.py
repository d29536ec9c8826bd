"""``docproc release``: canary, promote, rollback and blue-green switches as Knative traffic
blocks written into the kustomize overlays, and the odd/even cluster swap for Route 53.

It edits YAML files only, so every release is a reviewable pull request; it prints the diff
and the ``kubectl apply -k`` to run. Each function's traffic lives in
``knative/overlays/<cluster>/traffic/<function>.yaml``, a patch of its Knative Service that
the overlay's kustomization lists. Revisions are pinned by name (``latestRevision: false``)
and tagged ``current``, ``candidate`` or ``previous``, so each has its own URL
(``current-<service>.<domain>``) for testing before and after it takes traffic.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from events.subscriptions import ROUTES

FUNCTIONS = ("documents", "download", "users", *ROUTES)
CLUSTERS = ("odd", "even")
_REVISION = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ReleaseError(Exception):
    """The requested change would leave an inconsistent or unsafe traffic split."""


@dataclass(frozen=True)
class Change:
    path: Path
    before: str
    after: str

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
            fromfile=f"a/{self.path}", tofile=f"b/{self.path}"))


def service_name(function: str) -> str:
    return f"docproc-{function}"


class Releases:
    def __init__(self, knative_dir: Path) -> None:
        self.root = knative_dir

    def overlay(self, cluster: str) -> Path:
        if cluster not in CLUSTERS:
            raise ReleaseError(f"no cluster {cluster!r}; choose one of {', '.join(CLUSTERS)}")
        path = self.root / "overlays" / cluster
        if not (path / "kustomization.yaml").is_file():
            raise ReleaseError(f"{path}/kustomization.yaml does not exist")
        return path

    def _patch_path(self, cluster: str, function: str) -> Path:
        if function not in FUNCTIONS:
            raise ReleaseError(f"no function {function!r}; choose one of {', '.join(FUNCTIONS)}")
        return self.overlay(cluster) / "traffic" / f"{function}.yaml"

    def traffic(self, cluster: str, function: str) -> list[dict[str, Any]]:
        path = self._patch_path(cluster, function)
        if not path.exists():
            return []
        doc = yaml.safe_load(path.read_text()) or {}
        return list(doc.get("spec", {}).get("traffic", []))

    # -- the operations ------------------------------------------------------------------

    def canary(self, cluster: str, function: str, percent: int, revision: str,
               current: str | None = None) -> list[Change]:
        if not 0 < percent < 100:
            raise ReleaseError("a canary takes between 1 and 99 percent of the traffic")
        base = self._current(cluster, function, revision, current)
        if base == revision:
            raise ReleaseError(f"{revision} is already the current revision")
        return self._write(cluster, function, [
            _entry(base, 100 - percent, "current"),
            _entry(revision, percent, "candidate"),
        ])

    def promote(self, cluster: str, function: str) -> list[Change]:
        candidate = self._tagged(cluster, function, "candidate")
        current = self._tagged(cluster, function, "current")
        if candidate is None or current is None:
            raise ReleaseError(f"{function} on {cluster} has no canary to promote; "
                               "start one with `docproc release canary`")
        return self._write(cluster, function, [
            _entry(candidate["revisionName"], 100, "current"),
            _entry(current["revisionName"], 0, "previous"),
        ])

    def rollback(self, cluster: str, function: str) -> list[Change]:
        current = self._tagged(cluster, function, "current")
        candidate = self._tagged(cluster, function, "candidate")
        previous = self._tagged(cluster, function, "previous")
        if current is not None and candidate is not None:
            # Abort the canary: everything back on the current revision.
            return self._write(cluster, function, [_entry(current["revisionName"], 100,
                                                          "current")])
        if current is not None and previous is not None:
            # Undo the last promotion or switch.
            return self._write(cluster, function, [
                _entry(previous["revisionName"], 100, "current"),
                _entry(current["revisionName"], 0, "previous"),
            ])
        raise ReleaseError(f"{function} on {cluster} has nothing to roll back to")

    def switch(self, cluster: str, function: str, revision: str,
               current: str | None = None) -> list[Change]:
        """Blue-green: all traffic to ``revision`` at once, the old one kept tagged."""
        base = self._current(cluster, function, revision, current)
        if base == revision:
            raise ReleaseError(f"{revision} already takes all the traffic")
        return self._write(cluster, function, [_entry(revision, 100, "current"),
                                               _entry(base, 0, "previous")])

    # -- helpers -------------------------------------------------------------------------

    def _current(self, cluster: str, function: str, revision: str,
                 current: str | None) -> str:
        """The pinned current revision (or the one named, when none is pinned yet), after
        checking that both it and the new ``revision`` belong to the function."""
        self._check_revision(function, revision)
        stable = self._tagged(cluster, function, "current")
        base = stable["revisionName"] if stable else current
        if base is None:
            raise ReleaseError(f"{function} on {cluster} has no pinned current revision yet: "
                               "name it with --current")
        self._check_revision(function, str(base))
        return str(base)

    def _tagged(self, cluster: str, function: str, tag: str) -> dict[str, Any] | None:
        entries = self.traffic(cluster, function)
        _check_split(function, entries)
        return next((e for e in entries if e.get("tag") == tag), None)

    @staticmethod
    def _check_revision(function: str, revision: str) -> None:
        if not _REVISION.fullmatch(revision) or not revision.startswith(
                service_name(function) + "-"):
            raise ReleaseError(f"{revision!r} is not a revision of {service_name(function)} "
                               f"(expected {service_name(function)}-<name>)")

    def _write(self, cluster: str, function: str, entries: list[dict[str, Any]]) -> list[Change]:
        _check_split(function, entries)
        path = self._patch_path(cluster, function)
        before = path.read_text() if path.exists() else ""
        patch = {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                 "metadata": {"name": service_name(function)},
                 "spec": {"traffic": entries}}
        after = ("# Written by `docproc release`; review it like any change.\n"
                 + yaml.safe_dump(patch, sort_keys=False))
        path.parent.mkdir(exist_ok=True)
        path.write_text(after)
        changes = [Change(path, before, after)]
        kustomization = self.overlay(cluster) / "kustomization.yaml"
        k_before = kustomization.read_text()
        k_doc = yaml.safe_load(k_before) or {}
        rel = f"traffic/{function}.yaml"
        if not any(isinstance(p, dict) and p.get("path") == rel
                   for p in k_doc.get("patches") or []):
            # Edited as text, so the file's comments (its documentation) survive.
            entry = f"  - path: {rel}\n"
            if re.search(r"^patches:\s*$", k_before, flags=re.MULTILINE):
                k_after = re.sub(r"^patches:\s*\n", lambda m: m.group(0) + entry, k_before,
                                 count=1, flags=re.MULTILINE)
            else:
                k_after = k_before.rstrip("\n") + "\npatches:\n" + entry
            kustomization.write_text(k_after)
            changes.append(Change(kustomization, k_before, k_after))
        return changes


def _entry(revision: str, percent: int, tag: str) -> dict[str, Any]:
    return {"revisionName": revision, "percent": percent, "tag": tag, "latestRevision": False}


def _check_split(function: str, entries: list[dict[str, Any]]) -> None:
    if not entries:
        return
    total = sum(int(e.get("percent", 0)) for e in entries)
    if total != 100:
        raise ReleaseError(f"traffic of {function} adds up to {total}%, not 100%")
    names = [e.get("revisionName") for e in entries]
    if len(set(names)) != len(names):
        raise ReleaseError(f"traffic of {function} names a revision twice")
    tags = [e["tag"] for e in entries if e.get("tag")]
    if len(set(tags)) != len(tags):
        raise ReleaseError(f"traffic of {function} uses a tag twice")
    for e in entries:
        if e.get("latestRevision") is not False:
            raise ReleaseError(f"traffic of {function} must pin revisions "
                               "(latestRevision: false) while a release is managed")


# -- odd/even clusters and Route 53 -------------------------------------------------------

def swap_active(knative_dir: Path, to: str | None = None) -> tuple[list[Change], dict[str, Any]]:
    """Make the passive cluster active: the Route 53 failover pair for the production API
    points PRIMARY at it (SECONDARY at the other), the beta apps' record at the new passive
    one, and the overlays' active flag and scheduled jobs follow. Returns the file changes
    and the Route 53 change batch to apply."""
    clusters_file = knative_dir / "route53.yaml"
    before = clusters_file.read_text()
    config = yaml.safe_load(before)
    active = config["active"]
    if active not in CLUSTERS:
        raise ReleaseError(f"{clusters_file}: active must be odd or even, not {active!r}")
    new = to or ("even" if active == "odd" else "odd")
    if new not in CLUSTERS:
        raise ReleaseError(f"no cluster {new!r}")
    if new == active:
        raise ReleaseError(f"{new} is already the active cluster")
    config["active"] = new
    # The Route 53 batch first: a configuration it cannot be made from fails the command
    # before any file says the other cluster is active.
    try:
        batch = change_batch(config)
    except KeyError as exc:
        raise ReleaseError(f"{clusters_file}: no {exc.args[0]!r}") from None
    after = re.sub(r"^active:.*$", f"active: {new}", before, count=1, flags=re.MULTILINE)
    clusters_file.write_text(after)
    changes = [Change(clusters_file, before, after)]
    for cluster in CLUSTERS:
        changes += _flag_overlay(knative_dir / "overlays" / cluster, cluster == new)
    return changes, batch


def _flag_overlay(overlay: Path, active: bool) -> list[Change]:
    """The slot's docproc.io/active label, and its CronJobs running only when active."""
    changes = []
    edits = (
        (overlay / "slot.yaml", r'(docproc\.io/active: )"(?:true|false)"',
         rf'\g<1>"{str(active).lower()}"'),
        (overlay / "kustomization.yaml",
         r"(path: /spec/suspend\n\s*value: )(?:true|false)", rf"\g<1>{str(not active).lower()}"),
    )
    for path, pattern, replacement in edits:
        if not path.exists():
            continue
        text = path.read_text()
        new_text = re.sub(pattern, replacement, text, count=1)
        if new_text != text:
            path.write_text(new_text)
            changes.append(Change(path, text, new_text))
    return changes


def change_batch(config: dict[str, Any]) -> dict[str, Any]:
    active = config["active"]
    passive = "even" if active == "odd" else "odd"
    clusters = config["clusters"]
    record = config["record"]
    changes = []
    for role, cluster in (("PRIMARY", active), ("SECONDARY", passive)):
        target = clusters[cluster]
        changes.append({"Action": "UPSERT", "ResourceRecordSet": {
            "Name": record, "Type": "A", "SetIdentifier": f"docproc-{cluster}",
            "Failover": role, "HealthCheckId": target["health_check_id"],
            "AliasTarget": {"HostedZoneId": target["alb_zone_id"],
                            "DNSName": target["alb_dns"], "EvaluateTargetHealth": True}}})
    beta = clusters[passive]
    changes.append({"Action": "UPSERT", "ResourceRecordSet": {
        "Name": config["beta_record"], "Type": "A",
        "AliasTarget": {"HostedZoneId": beta["alb_zone_id"], "DNSName": beta["alb_dns"],
                        "EvaluateTargetHealth": True}}})
    return {"Comment": f"docproc: {active} active, {passive} passive (beta)",
            "Changes": changes}


def dump_batch(batch: dict[str, Any]) -> str:
    return json.dumps(batch, indent=2) + "\n"
