"""The ``docproc`` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from shared.config import ConfigError, load_settings


def _serve(args: argparse.Namespace) -> int:
    from docproc.serve import PipelineServer

    overrides: dict[str, object] = {}
    if args.port is not None:
        overrides["port"] = args.port
    settings = load_settings(**overrides)
    PipelineServer(settings, args.host, settings.port, threads=args.threads).run()
    return 0


def _worker(args: argparse.Namespace) -> int:
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
    svc = build_services(settings)
    runner = RabbitRunner(settings.amqp_url, settings.amqp_prefix,
                          EVENT_FUNCTIONS[args.name](svc), RetryPolicy(settings.retry_delays),
                          args.concurrency or settings.worker_concurrency)

    def stop(_sig: int, _frame: FrameType | None) -> None:
        runner.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relay = OutboxRelay(svc).start()
    try:
        runner.run()
    finally:
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


def _demo(args: argparse.Namespace) -> int:
    from docproc.demo import run_demo

    return run_demo(keep_running=args.keep_running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docproc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run every function in one process")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: $DOCPROC_PORT or 8080")
    serve.add_argument("--threads", type=int, default=8)
    serve.set_defaults(func=_serve)

    from docproc.registry import EVENT_FUNCTIONS

    worker = sub.add_parser("worker", help="run one event function on its RabbitMQ queue")
    worker.add_argument("name", choices=sorted(EVENT_FUNCTIONS))
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(func=_worker)

    apidoc = sub.add_parser("apidoc", help="write the OpenAPI and AsyncAPI documents")
    apidoc.add_argument("--out", default="docs", help="directory (default: docs)")
    apidoc.add_argument("--server", default="https://api.docproc.example",
                        help="server URL written into the OpenAPI document")
    apidoc.set_defaults(func=_apidoc)

    keys = sub.add_parser("keys", help="manage keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    rotate_link = keys_sub.add_parser("rotate-link", help="rotate the link signing key")
    rotate_link.set_defaults(func=_rotate_link_key)

    demo = sub.add_parser("demo", help="start the pipeline and send a sample document through it")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave the server running afterwards")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"docproc: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
