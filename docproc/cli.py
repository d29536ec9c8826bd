"""The ``docproc`` command."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from types import FrameType, ModuleType
from typing import TYPE_CHECKING

from pymongo.errors import ConnectionFailure

from shared.config import ConfigError, load_settings
from shared.mongo import unreachable
from shared.observability import setup_logging

if TYPE_CHECKING:
    from docproc.runtime import Services


def _serve(args: argparse.Namespace) -> int:
    from docproc.serve import PipelineServer

    overrides: dict[str, object] = {}
    if args.port is not None:
        overrides["port"] = args.port
    settings = load_settings(**overrides)
    PipelineServer(settings, args.host, settings.port, threads=args.threads,
                   http_only=args.http_only, processes=args.processes).run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from docproc import heap
    from docproc.health import serve_in_background
    from docproc.outbox import OutboxRelay
    from docproc.registry import EVENT_FUNCTIONS
    from docproc.runtime import build_services
    from events.runner import RabbitRunner
    from events.subscriptions import RetryPolicy

    settings = load_settings()
    if not settings.amqp_url:
        raise ConfigError("AMQP_URL: `docproc worker` consumes from RabbitMQ; set AMQP_URL "
                          "(or run everything in one process with `docproc serve`)")
    if not settings.mongodb_uri:
        raise ConfigError("MONGODB_URI: workers in separate processes must share a MongoDB "
                          "server; the embedded one belongs to a single process")
    svc = build_services(settings, wait_for_database_seconds=settings.startup_wait_seconds)
    runner = RabbitRunner(settings.amqp_url, settings.amqp_prefix,
                          EVENT_FUNCTIONS[args.name](svc), RetryPolicy(settings.retry_delays),
                          args.concurrency or settings.worker_concurrency, settings.worker_batch)

    def stop(_sig: int, _frame: FrameType | None) -> None:
        runner.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relay = OutboxRelay(svc).start()
    ops = serve_in_background(svc, args.ops_host, args.ops_port, needs_broker=True)
    heap.settle()
    try:
        runner.run()
    finally:
        ops.shutdown()
        relay.stop()
        svc.close()
    return 0


def _apidoc(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from docproc.apidoc import asyncapi, openapi

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, doc in (("openapi.json", openapi(args.server)), ("asyncapi.json", asyncapi())):
        (out / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(f"wrote {out / name}")
    return 0


def _rotate_link_key(args: argparse.Namespace) -> int:
    from shared.links import rotate_keyring

    settings = load_settings()
    if settings.link_key:
        raise ConfigError("DOCPROC_LINK_KEY: the signing key comes from configuration; rotate "
                          "it there (move it to DOCPROC_LINK_PREVIOUS_KEY with "
                          "DOCPROC_LINK_PREVIOUS_KEY_UNTIL, set a new DOCPROC_LINK_KEY)")
    key = rotate_keyring(settings.keys_dir, settings.link_grace_seconds)
    print(f"new link signing key {key.kid}; links signed before stay valid for "
          f"{settings.link_grace_seconds} s")
    return 0


def _services() -> Services:
    """Services for a one-off command: RabbitMQ when configured, else the embedded bus's
    queue in the database (which a running `docproc serve` shares)."""
    from docproc.runtime import build_services
    from events.bus import InProcessBus
    from events.subscriptions import RetryPolicy

    settings = load_settings()
    svc = build_services(settings)
    if svc.publisher is None:
        svc.publisher = InProcessBus(RetryPolicy(settings.retry_delays), svc.mongo.db)
    return svc


def _dlq(args: argparse.Namespace) -> int:
    from docproc.operations import check_function, dead_letters

    fn = check_function(args.function)
    ids = set(args.ids) if args.ids else None
    if args.action in ("replay", "purge") and ids is None and not args.all:
        raise ConfigError("name the dead letters to act on (ids), or pass --all")
    svc = _services()
    try:
        store = dead_letters(svc)
        if args.action == "list":
            letters = store.list(fn)
            for letter in letters:
                print(letter.summary)
            print(f"{len(letters)} dead letter(s) for {fn}")
        elif args.action == "show":
            for letter in store.list(fn):
                if ids is None or letter.id in ids:
                    print(json.dumps({"id": letter.id, "reason": letter.reason,
                                      "attempts": letter.attempts, "event": letter.event},
                                     indent=2, default=str))
        elif args.action == "replay":
            print(f"replayed {store.replay(fn, ids)} dead letter(s) to {fn}")
        else:
            print(f"purged {store.purge(fn, ids)} dead letter(s) of {fn}")
    finally:
        svc.close()
    return 0


def _reprocess(args: argparse.Namespace) -> int:
    from docproc import operations
    from docproc.operations import parse_age, reprocess

    if not args.ids and args.status != "processing":
        raise ConfigError("give document ids, or --status processing [--older-than AGE]")
    svc = _services()
    try:
        done = reprocess(svc, args.ids or None,
                         parse_age(args.older_than) if not args.ids else None)
    except operations.ReprocessInterrupted as exc:
        for doc_id in exc.done:
            print(f"requeued {doc_id}")
        print(f"docproc: {exc}; not sent: {', '.join(exc.left)}; run it again once the "
              "event transport answers (sending one twice is harmless)", file=sys.stderr)
        return 1
    finally:
        svc.close()
    for doc_id in done:
        print(f"requeued {doc_id}")
    print(f"{len(done)} document(s) sent to storage again")
    if not args.ids and len(done) >= operations.REPROCESS_BATCH:
        print(f"that is as many as one run sends ({operations.REPROCESS_BATCH}): more may be "
              "stuck; run this again once storage has taken these")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    svc = _services()
    try:
        older = svc.documents.pre_slot_indexes()
        filled = svc.documents.finish_migration()
    finally:
        svc.close()
    if not older:
        print("nothing left to migrate: the records are in this version's shape")
    else:
        print(f"filled {filled} uniqueness slot(s); dropped the older versions' indexes "
              f"({', '.join(sorted(older))})")
    return 0


def _rotate_keys(args: argparse.Namespace) -> int:
    from docproc.operations import rewrap_all
    from shared.keys import KeyProvider, KmsKeyProvider, LocalKeyring

    settings = load_settings()
    provider: KeyProvider
    if args.kms_key:
        provider = KmsKeyProvider(args.kms_key)
    elif settings.kms_key_id:
        raise ConfigError("KMS_KEY_ID: with KMS, rotate to a new key with --kms-key NEW_KEY "
                          "(then set KMS_KEY_ID to it), or enable KMS automatic rotation, "
                          "which needs no re-wrapping")
    else:
        ring = LocalKeyring(settings.keys_dir)
        if not args.resume:
            print(f"new key-encryption key {ring.rotate()}")
        provider = ring
    svc = _services()
    try:
        report = rewrap_all(svc, provider,
                            lambda done, total: print(f"  {done}/{total} documents",
                                                      flush=True))
    finally:
        svc.close()
    print(report)
    if args.kms_key:
        # Until then the running services wrap new uploads' keys under the old KEK.
        print(f"now set KMS_KEY_ID={args.kms_key} everywhere, then run this command again: "
              "documents uploaded before the switch are still under the old key")
    return 1 if report.failed else 0


def _progress(message: str) -> None:
    print(f"  {message}", flush=True)


def _backup(args: argparse.Namespace) -> int:
    from docproc import backup

    if args.action == "aws-plan":
        return _aws_backup_plan(args)
    if not args.location:
        raise ConfigError(f"backup {args.action} needs a location: a directory or "
                          "s3://bucket/prefix" + ("" if args.action in ("create", "list") else
                                                  ", the one backup's that `list` shows"))
    operational = _operational_errors()
    try:
        return _backup_action(backup, args)
    except backup.BackupError as exc:
        print(f"docproc: {exc}", file=sys.stderr)
        return 1
    except operational as exc:
        # The database, the file system or S3 failed under the command: say which and what,
        # without a traceback; a create leaves no manifest, so no backup is taken as complete.
        print(f"docproc: backup {args.action} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1


def _operational_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from pymongo.errors import PyMongoError

    from shared.keys import KeyProviderError

    return (PyMongoError, OSError, BotoCoreError, ClientError, KeyProviderError)


def _backup_action(backup: ModuleType, args: argparse.Namespace) -> int:
    if args.action == "list":
        summaries = backup.list_backups(args.location)
        for summary in summaries:
            print(summary)
        print(f"{len(summaries)} backup(s) under {args.location}")
        return 0
    svc = _services()
    try:
        if args.action == "create":
            print(backup.create_backup(svc, args.location, progress=_progress))
        elif args.action == "verify":
            report = backup.verify_backup(svc, args.location, sample=args.sample,
                                          progress=_progress)
            print(report)
            return 0 if report.ok else 1
        else:
            print(backup.restore_backup(svc, args.location, progress=_progress,
                                        allow_unsealed=args.allow_unsealed))
    finally:
        svc.close()
    return 0


def _aws_backup_plan(args: argparse.Namespace) -> int:
    import boto3

    from shared.aws_backup import ensure_backup_plan

    missing = [flag for flag, value in (("--efs-arn", args.efs_arn),
                                        ("--role-arn", args.role_arn)) if not value]
    if missing:
        raise ConfigError(f"aws-plan needs {' and '.join(missing)}")
    refs = ensure_backup_plan(boto3.client("backup"), vault_name=args.vault,
                              plan_name=args.plan, efs_arn=args.efs_arn,
                              iam_role_arn=args.role_arn, retention_days=args.retention_days,
                              kms_key_arn=args.kms_key)
    print(refs)
    return 0


def _release(args: argparse.Namespace) -> int:
    from pathlib import Path

    from docproc.release import ReleaseError, Releases, dump_batch, swap_active

    root = Path(args.knative)
    try:
        if args.action == "activate":
            changes, batch = swap_active(root, args.function)
            out = root / "route53-change.json"
            out.write_text(dump_batch(batch))
            for change in changes:
                print(change.diff())
            print(f"wrote {out}; apply it with:\n  aws route53 change-resource-record-sets "
                  f"--hosted-zone-id <zone> --change-batch file://{out}")
            return 0
        releases = Releases(root)
        if args.action == "canary":
            if args.percent is None or not args.revision:
                raise ReleaseError("canary needs a percent and --revision")
            changes = releases.canary(args.cluster, args.function, args.percent,
                                      args.revision, args.current)
        elif args.action == "promote":
            changes = releases.promote(args.cluster, args.function)
        elif args.action == "rollback":
            changes = releases.rollback(args.cluster, args.function)
        else:
            if not args.revision:
                raise ReleaseError("switch needs --revision")
            changes = releases.switch(args.cluster, args.function, args.revision, args.current)
    except ReleaseError as exc:
        print(f"docproc release: {exc}", file=sys.stderr)
        return 2
    for change in changes:
        print(change.diff())
    print(f"review, commit, then:\n  kubectl apply -k {root / 'overlays' / args.cluster}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import requests

    from docproc.demo import run_demo

    try:
        return run_demo(keep_running=args.keep_running)
    except (RuntimeError, requests.RequestException) as exc:
        # The server did not come up, or did not answer: say so, not a traceback.
        print(f"docproc demo: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docproc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run every function in one process")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: $DOCPROC_PORT or 8080")
    serve.add_argument("--threads", type=int, default=8)
    serve.add_argument("--http-only", action="store_true",
                       help="serve the HTTP functions only; `docproc worker` processes consume "
                            "the events (needs AMQP_URL and MONGODB_URI)")
    serve.add_argument("--processes", type=int, default=1,
                       help="gunicorn worker processes (more than 1 needs AMQP_URL and "
                            "MONGODB_URI)")
    serve.set_defaults(func=_serve)

    from docproc.registry import EVENT_FUNCTIONS

    worker = sub.add_parser("worker", help="run one event function on its RabbitMQ queue")
    worker.add_argument("name", choices=sorted(EVENT_FUNCTIONS))
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--ops-host", default="0.0.0.0",  # noqa: S104 - probes come from the kubelet
                        help="address of /healthz, /readyz and /metrics")
    worker.add_argument("--ops-port", type=int, default=9090,
                        help="port of /healthz, /readyz and /metrics (0: any free port)")
    worker.set_defaults(func=_worker)

    apidoc = sub.add_parser("apidoc", help="write the OpenAPI and AsyncAPI documents")
    apidoc.add_argument("--out", default="docs", help="directory (default: docs)")
    apidoc.add_argument("--server", default="https://api.docproc.example",
                        help="server URL written into the OpenAPI document")
    apidoc.set_defaults(func=_apidoc)

    dlq = sub.add_parser("dlq", help="inspect, replay or purge dead letters")
    dlq.add_argument("action", choices=["list", "show", "replay", "purge"])
    dlq.add_argument("function", help="storage or notification")
    dlq.add_argument("ids", nargs="*", help="event ids (default: all for list/show)")
    dlq.add_argument("--all", action="store_true", help="replay or purge every dead letter")
    dlq.set_defaults(func=_dlq)

    again = sub.add_parser("reprocess", help="send documents through storage again")
    again.add_argument("ids", nargs="*", help="document ids")
    again.add_argument("--status", choices=["processing"], default=None,
                       help="every document stuck in this status")
    again.add_argument("--older-than", default="10m", help="age like 90s, 10m, 2h (10m)")
    again.set_defaults(func=_reprocess)

    migrate = sub.add_parser("migrate", help="bring the records to this version's shape; "
                             "run once no older version runs")
    migrate.set_defaults(func=_migrate)

    keys = sub.add_parser("keys", help="manage keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    rotate = keys_sub.add_parser("rotate", help="new key-encryption key; re-wrap every "
                                 "data key (documents untouched); safe to interrupt and rerun")
    rotate.add_argument("--kms-key", help="the new KMS key (id, ARN or alias)")
    rotate.add_argument("--resume", action="store_true",
                        help="finish an interrupted rotation without making another key")
    rotate.set_defaults(func=_rotate_keys)
    rotate_link = keys_sub.add_parser("rotate-link", help="rotate the link signing key")
    rotate_link.set_defaults(func=_rotate_link_key)

    backup = sub.add_parser("backup", help="consistent backups of EFS and MongoDB; AWS Backup")
    backup.add_argument("action", choices=["create", "list", "verify", "restore", "aws-plan"])
    backup.add_argument("location", nargs="?", default="",
                        help="a directory or s3://bucket/prefix (create, list), or one "
                             "backup's location (verify, restore)")
    backup.add_argument("--allow-unsealed", action="store_true",
                        help="restore: accept a manifest without a seal (backups made before "
                             "docproc sealed them)")
    backup.add_argument("--sample", type=int, default=None,
                        help="verify: decrypt and check this many documents (default: all)")
    backup.add_argument("--vault", default="docproc", help="aws-plan: backup vault name")
    backup.add_argument("--plan", default="docproc-efs", help="aws-plan: backup plan name")
    backup.add_argument("--efs-arn", help="aws-plan: the EFS file system ARN")
    backup.add_argument("--role-arn", help="aws-plan: IAM role AWS Backup assumes")
    backup.add_argument("--retention-days", type=int, default=35)
    backup.add_argument("--kms-key", help="aws-plan: KMS key ARN for the vault")
    backup.set_defaults(func=_backup)

    release = sub.add_parser("release", help="traffic splits in the Knative overlays, and the "
                             "odd/even cluster swap")
    release.add_argument("action", choices=["canary", "promote", "rollback", "switch",
                                            "activate"],
                         help="switch: blue-green; activate: make a cluster the active one")
    release.add_argument("function", nargs="?", default=None,
                         help="the function (for activate: odd or even, default the passive)")
    release.add_argument("percent", nargs="?", type=int, default=None,
                         help="canary: the candidate's share of traffic")
    release.add_argument("--revision", help="the new revision (canary, switch)")
    release.add_argument("--current", help="the revision serving now, when none is pinned yet")
    release.add_argument("--cluster", default="odd", choices=["odd", "even"])
    release.add_argument("--knative", default="knative", help="the knative/ directory")
    release.set_defaults(func=_release)

    demo = sub.add_parser("demo", help="start the pipeline and send a sample document through it")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave the server running afterwards")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except (ConfigError, ValueError, LookupError) as exc:
        print(f"docproc: {exc}", file=sys.stderr)
        return 2
    except ConnectionFailure as exc:
        print(f"docproc: database unreachable: {unreachable(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
