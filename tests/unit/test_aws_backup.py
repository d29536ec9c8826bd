"""AWS Backup set-up (shared/aws_backup.py) against moto's AWS Backup.

moto 5.2 implements backup vaults (create, describe, list) and backup plans (create, get,
list, delete) but not ``update_backup_plan`` nor any backup-selection call
(create/get/list/delete_backup_selection): it raises NotImplementedError for those. The tests
that need them are written against AWS's real behaviour and marked strict xfail on exactly
that error, so they start failing (XPASS) the day moto implements the calls, as a reminder
to drop the mark. Nothing here stubs AWS responses by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from shared.aws_backup import (
    AwsBackupError,
    backup_plan_document,
    describe,
    ensure_backup_plan,
    ensure_plan,
    ensure_vault,
)

REGION = "eu-west-1"
ACCOUNT = "123456789012"
EFS_ARN = f"arn:aws:elasticfilesystem:{REGION}:{ACCOUNT}:file-system/fs-0123456789abcdef0"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/service-role/AWSBackupDefaultServiceRole"
KEY_A = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-1111-1111-1111-111111111111"
KEY_B = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/22222222-2222-2222-2222-222222222222"

moto_lacks = pytest.mark.xfail(
    raises=NotImplementedError, strict=True,
    reason="moto does not implement update_backup_plan / backup selections",
)


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # moto intercepts AWS's own endpoints; a custom endpoint would bypass it.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield boto3.client("backup")


def _plan(retention_days: int = 35) -> dict[str, Any]:
    return backup_plan_document(plan_name="docproc-efs", vault_name="docproc",
                                retention_days=retention_days)


def test_vault_is_created_once(client: Any) -> None:
    arn, outcome = ensure_vault(client, "docproc", kms_key_arn=KEY_A)
    assert outcome == "created"
    assert arn.endswith(":backup-vault:docproc")
    again, outcome = ensure_vault(client, "docproc", kms_key_arn=KEY_A)
    assert (again, outcome) == (arn, "exists")
    vaults = client.list_backup_vaults()["BackupVaultList"]
    assert [v["BackupVaultName"] for v in vaults] == ["docproc"]


def test_vault_under_another_key_is_an_error_not_a_silent_reuse(client: Any) -> None:
    ensure_vault(client, "docproc", kms_key_arn=KEY_A)
    with pytest.raises(AwsBackupError, match="cannot be changed"):
        ensure_vault(client, "docproc", kms_key_arn=KEY_B)


def test_plan_is_created_once_and_then_left_alone(client: Any) -> None:
    ensure_vault(client, "docproc")
    refs, outcome = ensure_plan(client, _plan())
    assert outcome == "created"
    again, outcome = ensure_plan(client, _plan())
    assert outcome == "unchanged"
    assert again == refs  # same plan, same version: nothing was rewritten

    stored = client.get_backup_plan(BackupPlanId=refs["BackupPlanId"])["BackupPlan"]
    (rule,) = stored["Rules"]
    assert rule["TargetBackupVaultName"] == "docproc"
    assert rule["ScheduleExpression"] == "cron(0 3 * * ? *)"
    assert rule["Lifecycle"] == {"DeleteAfterDays": 35}
    plans = client.list_backup_plans()["BackupPlansList"]
    assert [p["BackupPlanName"] for p in plans] == ["docproc-efs"]


def test_describe_an_empty_account(client: Any) -> None:
    assert describe(client, "docproc", "docproc-efs") == {
        "vault": None, "plan": None, "selections": []}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"efs_arn": "fs-0123"}, "EFS file system ARN"),
        ({"iam_role_arn": "AWSBackupDefaultServiceRole"}, "IAM role ARN"),
        ({"schedule": "every night"}, "cron"),
        ({"retention_days": 0}, "retention_days"),
        ({"vault_name": "no spaces allowed"}, "vault name"),
        ({"kms_key_arn": "alias/docproc"}, "KMS key ARN"),
    ],
)
def test_invalid_settings_are_refused_before_anything_is_created(
    client: Any, overrides: dict[str, Any], message: str,
) -> None:
    args: dict[str, Any] = {"vault_name": "docproc", "plan_name": "docproc-efs",
                            "efs_arn": EFS_ARN, "iam_role_arn": ROLE_ARN, **overrides}
    with pytest.raises(AwsBackupError, match=message):
        ensure_backup_plan(client, **args)
    assert client.list_backup_vaults()["BackupVaultList"] == []
    assert client.list_backup_plans()["BackupPlansList"] == []


@moto_lacks
def test_changed_retention_updates_the_plan_in_place(client: Any) -> None:
    ensure_vault(client, "docproc")
    refs, _ = ensure_plan(client, _plan(35))
    updated, outcome = ensure_plan(client, _plan(90))
    assert outcome == "updated"
    assert updated["BackupPlanId"] == refs["BackupPlanId"]
    assert updated["VersionId"] != refs["VersionId"]
    rule = client.get_backup_plan(BackupPlanId=refs["BackupPlanId"])["BackupPlan"]["Rules"][0]
    assert rule["Lifecycle"]["DeleteAfterDays"] == 90


@moto_lacks
def test_ensure_backup_plan_assigns_the_file_system_and_is_idempotent(client: Any) -> None:
    first = ensure_backup_plan(client, vault_name="docproc", plan_name="docproc-efs",
                               efs_arn=EFS_ARN, iam_role_arn=ROLE_ARN)
    assert first.changes == ("vault created", "plan created", "selection created")
    second = ensure_backup_plan(client, vault_name="docproc", plan_name="docproc-efs",
                                efs_arn=EFS_ARN, iam_role_arn=ROLE_ARN)
    assert second.changes == ("vault exists", "plan unchanged", "selection unchanged")
    assert second.selection_id == first.selection_id
    state = describe(client, "docproc", "docproc-efs")
    assert state["plan"]["BackupPlanId"] == first.plan_id
    assert state["selections"] == [{"id": first.selection_id, "name": "docproc-efs-efs",
                                    "iam_role_arn": ROLE_ARN, "resources": [EFS_ARN]}]
