"""docproc release on a copy of an overlay: the traffic blocks it writes, and the states it
refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from docproc.cli import main
from docproc.release import ReleaseError, Releases, change_batch

ROOT = Path(__file__).resolve().parents[2]
REV = "docproc-documents-{}"


@pytest.fixture
def knative(tmp_path: Path) -> Path:
    """A copy of the project's knative/ (when it has overlays), else a minimal stand-in."""
    copy = tmp_path / "knative"
    if (ROOT / "knative" / "overlays" / "odd" / "kustomization.yaml").exists():
        shutil.copytree(ROOT / "knative", copy)
    else:
        for cluster in ("odd", "even"):
            overlay = copy / "overlays" / cluster
            overlay.mkdir(parents=True)
            (overlay / "kustomization.yaml").write_text("resources:\n- ../../base\n")
    return copy


def _traffic(knative: Path, function: str = "documents") -> list[dict[str, object]]:
    return Releases(knative).traffic("odd", function)


def test_canary_then_promote(knative: Path) -> None:
    releases = Releases(knative)
    changes = releases.canary("odd", "documents", 10, REV.format("00008"),
                              current=REV.format("00007"))
    assert "+    percent: 10" in changes[0].diff()
    assert _traffic(knative) == [
        {"revisionName": REV.format("00007"), "percent": 90, "tag": "current",
         "latestRevision": False},
        {"revisionName": REV.format("00008"), "percent": 10, "tag": "candidate",
         "latestRevision": False},
    ]
    kustomization = yaml.safe_load((knative / "overlays/odd/kustomization.yaml").read_text())
    assert {"path": "traffic/documents.yaml"} in kustomization["patches"]
    releases.canary("odd", "documents", 50, REV.format("00008"))  # widen the canary
    assert [e["percent"] for e in _traffic(knative)] == [50, 50]
    releases.promote("odd", "documents")
    assert _traffic(knative) == [
        {"revisionName": REV.format("00008"), "percent": 100, "tag": "current",
         "latestRevision": False},
        {"revisionName": REV.format("00007"), "percent": 0, "tag": "previous",
         "latestRevision": False},
    ]
    # and undoing the promotion brings the old revision back
    releases.rollback("odd", "documents")
    assert [(e["revisionName"], e["percent"]) for e in _traffic(knative)] == [
        (REV.format("00007"), 100), (REV.format("00008"), 0)]


def test_canary_then_rollback(knative: Path) -> None:
    releases = Releases(knative)
    releases.canary("odd", "documents", 20, REV.format("00008"), current=REV.format("00007"))
    releases.rollback("odd", "documents")
    assert _traffic(knative) == [{"revisionName": REV.format("00007"), "percent": 100,
                                  "tag": "current", "latestRevision": False}]
    with pytest.raises(ReleaseError, match="no canary to promote"):
        releases.promote("odd", "documents")


def test_inconsistent_states_are_refused(knative: Path) -> None:
    releases = Releases(knative)
    with pytest.raises(ReleaseError, match="no canary to promote"):
        releases.promote("odd", "documents")  # never canaried
    with pytest.raises(ReleaseError, match="between 1 and 99"):
        releases.canary("odd", "documents", 100, REV.format("00008"), REV.format("00007"))
    with pytest.raises(ReleaseError, match="not a revision of docproc-documents"):
        releases.canary("odd", "documents", 10, "docproc-users-00001", REV.format("00007"))
    with pytest.raises(ReleaseError, match="no pinned current revision"):
        releases.canary("odd", "documents", 10, REV.format("00008"))
    with pytest.raises(ReleaseError, match="no function"):
        releases.canary("odd", "printer", 10, "docproc-printer-1", "docproc-printer-0")
    # a hand-edited split that does not add up is refused before anything else is done
    patch = knative / "overlays/odd/traffic/documents.yaml"
    patch.parent.mkdir(exist_ok=True)
    patch.write_text(yaml.safe_dump({"spec": {"traffic": [
        {"revisionName": REV.format("00007"), "percent": 70, "tag": "current",
         "latestRevision": False}]}}))
    with pytest.raises(ReleaseError, match="adds up to 70%"):
        releases.canary("odd", "documents", 10, REV.format("00008"))


def test_blue_green_switch(knative: Path) -> None:
    releases = Releases(knative)
    releases.switch("odd", "documents", REV.format("00009"), current=REV.format("00007"))
    assert [(e["revisionName"], e["percent"], e["tag"]) for e in _traffic(knative)] == [
        (REV.format("00009"), 100, "current"), (REV.format("00007"), 0, "previous")]
    with pytest.raises(ReleaseError, match="already takes all"):
        releases.switch("odd", "documents", REV.format("00009"))


def test_cli_prints_the_diff_and_the_apply_command(
    knative: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["release", "canary", "documents", "10", "--revision", REV.format("00002"),
            "--current", REV.format("00001"), "--knative", str(knative)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "+    percent: 90" in out
    assert f"kubectl apply -k {knative / 'overlays' / 'odd'}" in out
    assert main(["release", "promote", "users", "--knative", str(knative)]) == 2
    assert "no canary to promote" in capsys.readouterr().err


def test_activate_swaps_the_failover_pair_the_beta_record_and_the_overlays(
    knative: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    if not (knative / "route53.yaml").exists():
        pytest.skip("the project has no knative/route53.yaml")  # only without real overlays
    before = yaml.safe_load((knative / "route53.yaml").read_text())
    passive = "even" if before["active"] == "odd" else "odd"
    assert main(["release", "activate", "--knative", str(knative)]) == 0
    assert yaml.safe_load((knative / "route53.yaml").read_text())["active"] == passive
    batch = json.loads((knative / "route53-change.json").read_text())
    sets = {(c["ResourceRecordSet"]["Name"], c["ResourceRecordSet"].get("Failover")):
            c["ResourceRecordSet"] for c in batch["Changes"]}
    record, beta = before["record"], before["beta_record"]
    assert sets[(record, "PRIMARY")]["AliasTarget"]["DNSName"] == \
        before["clusters"][passive]["alb_dns"]
    assert sets[(record, "SECONDARY")]["HealthCheckId"] == \
        before["clusters"][before["active"]]["health_check_id"]
    assert sets[(beta, None)]["AliasTarget"]["DNSName"] == \
        before["clusters"][before["active"]]["alb_dns"]
    out = capsys.readouterr().out
    assert "aws route53 change-resource-record-sets" in out
    for slot in ("odd", "even"):
        label = f'docproc.io/active: "{str(slot == passive).lower()}"'
        assert label in (knative / "overlays" / slot / "slot.yaml").read_text()
        suspend = f"value: {str(slot != passive).lower()}"
        assert suspend in (knative / "overlays" / slot / "kustomization.yaml").read_text()
    assert main(["release", "activate", passive, "--knative", str(knative)]) == 2


def test_activate_changes_nothing_when_its_route53_batch_cannot_be_made(
    knative: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    if not (knative / "route53.yaml").exists():
        pytest.skip("the project has no knative/route53.yaml")
    config = yaml.safe_load((knative / "route53.yaml").read_text())
    del config["beta_record"]
    (knative / "route53.yaml").write_text(yaml.safe_dump(config))
    files = {p: p.read_text() for p in knative.rglob("*.yaml")}
    assert main(["release", "activate", "--knative", str(knative)]) == 2
    assert "beta_record" in capsys.readouterr().err
    assert {p: p.read_text() for p in knative.rglob("*.yaml")} == files
    assert not (knative / "route53-change.json").exists()


def test_the_copied_overlays_still_render_after_releases(knative: Path) -> None:
    import subprocess
    import sys

    if not (knative / "overlays" / "odd" / "slot.yaml").exists():
        pytest.skip("the project has no overlays yet")
    releases = Releases(knative)
    releases.canary("odd", "documents", 10, REV.format("00002"), current=REV.format("00001"))
    kubectl = Path(sys.executable).with_name("kubectl")
    rendered = subprocess.run([str(kubectl if kubectl.exists() else "kubectl"), "kustomize",
                               str(knative / "overlays" / "odd")], capture_output=True,
                              text=True, timeout=120, check=True).stdout
    services = [d for d in yaml.safe_load_all(rendered)
                if d and d["kind"] == "Service" and d["metadata"]["name"] == "docproc-documents"
                and d["apiVersion"].startswith("serving.knative.dev")]
    assert services[0]["spec"]["traffic"][1] == {
        "revisionName": REV.format("00002"), "percent": 10, "tag": "candidate",
        "latestRevision": False}
    # the other settings of the Service survive the patch
    assert services[0]["spec"]["template"]["spec"]["containers"]


def test_change_batch_applies_to_route53(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch is one Route 53 accepts (moto implements change_resource_record_sets)."""
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        r53 = boto3.client("route53")
        zone = r53.create_hosted_zone(Name="docproc.example.", CallerReference="t")
        zone_id = zone["HostedZone"]["Id"]
        checks = {c: r53.create_health_check(CallerReference=c, HealthCheckConfig={
            "Type": "HTTPS", "FullyQualifiedDomainName": f"{c}.docproc.example",
            "ResourcePath": "/healthz"})["HealthCheck"]["Id"] for c in ("odd", "even")}
        zone_short = zone_id.split("/")[-1]
        config = {"record": "api.docproc.example.", "beta_record": "beta-api.docproc.example.",
                  "active": "even", "clusters": {c: {
                      "alb_dns": f"{c}-alb.elb.amazonaws.com.", "alb_zone_id": zone_short,
                      "health_check_id": checks[c]} for c in ("odd", "even")}}
        r53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch=change_batch(config))
        records = r53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
        failover = {r.get("Failover"): r["AliasTarget"]["DNSName"] for r in records
                    if r["Name"] == "api.docproc.example."}
        assert failover["PRIMARY"].startswith("even")
        assert failover["SECONDARY"].startswith("odd")
