"""AWS Backup for the production EFS file system, set up idempotently with boto3.

``docproc.backup`` makes application-consistent logical backups (a MongoDB export plus the
ciphertext files it references). AWS Backup adds scheduled, point-in-time recovery points of
the whole EFS file system, kept in a backup vault for a retention period, which protects the
store against a lost or corrupted file system without any code running in the cluster.

``ensure_backup_plan`` converges three resources and can run on every deploy:

* the **backup vault** (created when missing; its encryption key cannot change afterwards,
  so a vault encrypted under another key than the one asked for is an error, not an update);
* the **backup plan** (one rule: schedule, start and completion windows, retention),
  created when missing and updated when its rules differ from the wanted ones;
* the **backup selection** assigning the EFS file system ARN to the plan under an IAM role
  that AWS Backup assumes (it needs ``AWSBackupServiceRolePolicyForBackup`` and, to restore,
  ``AWSBackupServiceRolePolicyForRestores``). AWS Backup has no UpdateBackupSelection, so a
  selection that differs is deleted and created again.

What an EFS recovery point does and does not cover:

* The files on EFS are envelope ciphertext; their data keys live, wrapped, in MongoDB, and
  the key-encryption keys in KMS. An EFS recovery point alone restores nothing readable: pair
  it with a MongoDB backup of the same time (``docproc backup create`` or the database
  service's own snapshots) and keep the KMS key (deleting it makes every backup unreadable).
* A recovery point is crash-consistent, not consistent with MongoDB: objects of documents
  stored after the database snapshot are unreferenced extra files, and documents stored
  after the EFS snapshot lack their file. ``docproc.backup`` takes the consistent route
  (export first, then exactly the objects it references) when that matters.
* Crypto-shredding a document destroys its wrapped key in MongoDB; a database backup taken
  earlier still holds it, so a deleted document stays recoverable from backups until they
  expire: ``retention_days`` bounds how long a deletion takes to become final.

Tests run against moto, which implements vaults and plans but, as of moto 5.2, neither
``update_backup_plan`` nor any backup-selection call (see tests/unit/test_aws_backup.py).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "AwsBackupError",
    "BackupPlanRefs",
    "aws_error_code",
    "backup_plan_document",
    "describe",
    "ensure_backup_plan",
    "ensure_plan",
    "ensure_selection",
    "ensure_vault",
]

DEFAULT_SCHEDULE: Final = "cron(0 3 * * ? *)"
# Spelled out (they are AWS's defaults) so that comparing the rule AWS returns with the one
# wanted does not depend on which defaults the service fills in.
START_WINDOW_MINUTES: Final = 480
COMPLETION_WINDOW_MINUTES: Final = 10080
SCHEDULE_TIMEZONE: Final = "Etc/UTC"
RULE_NAME: Final = "scheduled-efs"

_EFS_ARN: Final = re.compile(
    r"arn:aws[a-z-]*:elasticfilesystem:[a-z0-9-]+:\d{12}:file-system/fs-[0-9a-f]+"
)
_ROLE_ARN: Final = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
_KMS_ARN: Final = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[\w-]+")
_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,50}")

VaultOutcome = Literal["created", "exists"]
PlanOutcome = Literal["created", "updated", "unchanged"]
SelectionOutcome = Literal["created", "replaced", "unchanged"]


class AwsBackupError(Exception):
    """The wanted backup configuration is invalid or conflicts with what exists."""


@dataclass(frozen=True)
class BackupPlanRefs:
    vault_name: str
    vault_arn: str
    plan_id: str
    plan_arn: str
    plan_version_id: str
    selection_id: str
    # What this call did, e.g. ("vault created", "plan unchanged", "selection created").
    changes: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "\n".join([
            f"vault      {self.vault_name}  {self.vault_arn}",
            f"plan       {self.plan_id}  {self.plan_arn}  (version {self.plan_version_id})",
            f"selection  {self.selection_id}",
            "changes    " + (", ".join(self.changes) or "none"),
        ])


def aws_error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _clean(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


def _check(value: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(value):
        raise AwsBackupError(f"{what} {value!r} is not valid (expected {pattern.pattern})")


def backup_plan_document(*, plan_name: str, vault_name: str, schedule: str = DEFAULT_SCHEDULE,
                         retention_days: int = 35) -> dict[str, Any]:
    """The ``BackupPlan`` argument for create/update_backup_plan: one scheduled rule."""
    _check(plan_name, _NAME, "plan name")
    _check(vault_name, _NAME, "vault name")
    if not (schedule.startswith(("cron(", "rate(")) and schedule.endswith(")")):
        raise AwsBackupError(f"schedule {schedule!r} must be a cron(...) or rate(...) expression")
    if retention_days < 1:
        raise AwsBackupError(f"retention_days must be at least 1, got {retention_days}")
    return {
        "BackupPlanName": plan_name,
        "Rules": [{
            "RuleName": RULE_NAME,
            "TargetBackupVaultName": vault_name,
            "ScheduleExpression": schedule,
            "ScheduleExpressionTimezone": SCHEDULE_TIMEZONE,
            "StartWindowMinutes": START_WINDOW_MINUTES,
            "CompletionWindowMinutes": COMPLETION_WINDOW_MINUTES,
            "Lifecycle": {"DeleteAfterDays": retention_days},
        }],
    }


def _rule_signature(rule: dict[str, Any]) -> tuple[Any, ...]:
    """The parts of a rule this module manages, with AWS's defaults filled in, so a rule read
    back from AWS (which adds RuleId and defaults) compares equal to the one sent."""
    lifecycle = rule.get("Lifecycle") or {}
    return (
        rule.get("RuleName"),
        rule.get("TargetBackupVaultName"),
        rule.get("ScheduleExpression"),
        rule.get("ScheduleExpressionTimezone") or SCHEDULE_TIMEZONE,
        rule.get("StartWindowMinutes", START_WINDOW_MINUTES),
        rule.get("CompletionWindowMinutes", COMPLETION_WINDOW_MINUTES),
        lifecycle.get("DeleteAfterDays"),
        lifecycle.get("MoveToColdStorageAfterDays"),
        bool(rule.get("CopyActions")),
        bool(rule.get("EnableContinuousBackup")),
    )


def _rules_differ(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    have = sorted((_rule_signature(r) for r in current.get("Rules", [])), key=repr)
    want = sorted((_rule_signature(r) for r in wanted["Rules"]), key=repr)
    return have != want


def _describe_vault(client: Any, vault_name: str) -> dict[str, Any] | None:
    try:
        return _clean(client.describe_backup_vault(BackupVaultName=vault_name))
    except Exception as exc:
        if aws_error_code(exc) == "ResourceNotFoundException":
            return None
        raise


def ensure_vault(client: Any, vault_name: str, *,
                 kms_key_arn: str | None = None) -> tuple[str, VaultOutcome]:
    """The vault's ARN, creating the vault when missing."""
    _check(vault_name, _NAME, "vault name")
    if kms_key_arn is not None:
        _check(kms_key_arn, _KMS_ARN, "KMS key ARN")
    existing = _describe_vault(client, vault_name)
    if existing is None:
        args: dict[str, Any] = {"BackupVaultName": vault_name,
                                "CreatorRequestId": str(uuid.uuid4())}
        if kms_key_arn is not None:
            args["EncryptionKeyArn"] = kms_key_arn
        try:
            created = client.create_backup_vault(**args)
        except Exception as exc:
            # Another deploy created it between our describe and create: use theirs.
            if aws_error_code(exc) != "AlreadyExistsException":
                raise
            existing = _describe_vault(client, vault_name)
            if existing is None:
                raise
        else:
            return str(created["BackupVaultArn"]), "created"
    current_key = existing.get("EncryptionKeyArn")
    if kms_key_arn is not None and current_key and current_key != kms_key_arn:
        # A vault's encryption key is fixed at creation; silently using another key would
        # leave recovery points encrypted under a key the operator did not ask for.
        raise AwsBackupError(
            f"backup vault {vault_name} is encrypted with {current_key}, not {kms_key_arn}; "
            "a vault's key cannot be changed: choose another vault name or drop kms_key_arn"
        )
    return str(existing["BackupVaultArn"]), "exists"


def _find_plan(client: Any, plan_name: str) -> dict[str, Any] | None:
    found = []
    for page in client.get_paginator("list_backup_plans").paginate():
        found += [p for p in page.get("BackupPlansList", [])
                  if p.get("BackupPlanName") == plan_name and not p.get("DeletionDate")]
    if len(found) > 1:
        ids = ", ".join(str(p["BackupPlanId"]) for p in found)
        raise AwsBackupError(f"several backup plans are named {plan_name!r} ({ids}); "
                             "delete the extra ones so the plan to manage is unambiguous")
    return found[0] if found else None


def ensure_plan(client: Any, wanted: dict[str, Any]) -> tuple[dict[str, str], PlanOutcome]:
    """Create the plan ``wanted`` (see ``backup_plan_document``) or bring its rules in line.

    Returns ``{"BackupPlanId", "BackupPlanArn", "VersionId"}`` and what was done.
    """
    summary = _find_plan(client, wanted["BackupPlanName"])
    if summary is None:
        created = client.create_backup_plan(BackupPlan=wanted,
                                            CreatorRequestId=str(uuid.uuid4()))
        return _plan_refs(created), "created"
    current = client.get_backup_plan(BackupPlanId=summary["BackupPlanId"])
    if not _rules_differ(current.get("BackupPlan", {}), wanted):
        return _plan_refs(current), "unchanged"
    updated = client.update_backup_plan(BackupPlanId=summary["BackupPlanId"], BackupPlan=wanted)
    return _plan_refs(updated), "updated"


def _plan_refs(response: dict[str, Any]) -> dict[str, str]:
    return {k: str(response[k]) for k in ("BackupPlanId", "BackupPlanArn", "VersionId")}


def _selection_matches(selection: dict[str, Any], efs_arn: str, iam_role_arn: str) -> bool:
    conditions = selection.get("Conditions") or {}
    return (
        selection.get("IamRoleArn") == iam_role_arn
        and list(selection.get("Resources") or []) == [efs_arn]
        and not selection.get("NotResources")
        and not selection.get("ListOfTags")
        and not any(conditions.values())
    )


def _list_selections(client: Any, plan_id: str) -> list[dict[str, Any]]:
    selections: list[dict[str, Any]] = []
    for page in client.get_paginator("list_backup_selections").paginate(BackupPlanId=plan_id):
        selections += page.get("BackupSelectionsList", [])
    return selections


def ensure_selection(client: Any, *, plan_id: str, selection_name: str, efs_arn: str,
                     iam_role_arn: str) -> tuple[str, SelectionOutcome]:
    """The id of the selection assigning exactly ``efs_arn`` to the plan under the role."""
    _check(selection_name, _NAME, "selection name")
    _check(efs_arn, _EFS_ARN, "EFS file system ARN")
    _check(iam_role_arn, _ROLE_ARN, "IAM role ARN")
    outcome: SelectionOutcome = "created"
    for summary in _list_selections(client, plan_id):
        if summary.get("SelectionName") != selection_name:
            continue
        current = client.get_backup_selection(BackupPlanId=plan_id,
                                              SelectionId=summary["SelectionId"])
        if _selection_matches(current.get("BackupSelection", {}), efs_arn, iam_role_arn):
            return str(summary["SelectionId"]), "unchanged"
        # Selections are immutable in AWS Backup: replace the stale one.
        client.delete_backup_selection(BackupPlanId=plan_id, SelectionId=summary["SelectionId"])
        outcome = "replaced"
    created = client.create_backup_selection(
        BackupPlanId=plan_id,
        BackupSelection={"SelectionName": selection_name, "IamRoleArn": iam_role_arn,
                         "Resources": [efs_arn]},
        CreatorRequestId=str(uuid.uuid4()),
    )
    return str(created["SelectionId"]), outcome


def ensure_backup_plan(
    client: Any,
    *,
    vault_name: str,
    plan_name: str,
    efs_arn: str,
    iam_role_arn: str,
    schedule: str = DEFAULT_SCHEDULE,
    retention_days: int = 35,
    kms_key_arn: str | None = None,
) -> BackupPlanRefs:
    """Make AWS Backup back up the EFS file system on ``schedule`` into ``vault_name`` and keep
    each recovery point ``retention_days``; safe to repeat (see the module docstring).

    ``client`` is ``boto3.client("backup")`` in the region of the file system.
    """
    # Validate everything before the first call so a typo changes nothing in the account.
    wanted = backup_plan_document(plan_name=plan_name, vault_name=vault_name,
                                  schedule=schedule, retention_days=retention_days)
    _check(efs_arn, _EFS_ARN, "EFS file system ARN")
    _check(iam_role_arn, _ROLE_ARN, "IAM role ARN")
    vault_arn, vault_outcome = ensure_vault(client, vault_name, kms_key_arn=kms_key_arn)
    plan, plan_outcome = ensure_plan(client, wanted)
    selection_id, selection_outcome = ensure_selection(
        client, plan_id=plan["BackupPlanId"], selection_name=f"{plan_name}-efs",
        efs_arn=efs_arn, iam_role_arn=iam_role_arn,
    )
    return BackupPlanRefs(
        vault_name=vault_name,
        vault_arn=vault_arn,
        plan_id=plan["BackupPlanId"],
        plan_arn=plan["BackupPlanArn"],
        plan_version_id=plan["VersionId"],
        selection_id=selection_id,
        changes=(f"vault {vault_outcome}", f"plan {plan_outcome}",
                 f"selection {selection_outcome}"),
    )


def describe(client: Any, vault_name: str, plan_name: str) -> dict[str, Any]:
    """What exists: ``{"vault": ... | None, "plan": ... | None, "selections": [...]}``.

    ``plan`` holds its id, ARN, version and the ``BackupPlan`` document as AWS returns it;
    each selection its id, name, role and resources.
    """
    vault = _describe_vault(client, vault_name)
    summary = _find_plan(client, plan_name)
    if summary is None:
        return {"vault": vault, "plan": None, "selections": []}
    plan = _clean(client.get_backup_plan(BackupPlanId=summary["BackupPlanId"]))
    selections = []
    for item in _list_selections(client, plan["BackupPlanId"]):
        detail = client.get_backup_selection(BackupPlanId=plan["BackupPlanId"],
                                             SelectionId=item["SelectionId"])
        body = detail.get("BackupSelection", {})
        selections.append({
            "id": item["SelectionId"],
            "name": body.get("SelectionName", item.get("SelectionName")),
            "iam_role_arn": body.get("IamRoleArn", item.get("IamRoleArn")),
            "resources": list(body.get("Resources") or []),
        })
    return {"vault": vault, "plan": plan, "selections": selections}
