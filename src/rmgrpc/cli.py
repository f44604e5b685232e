"""`rmgrpc`: the server's command line (`rmgrpc serve`, `rmgrpc config`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from rmgrpc.config import ConfigError, example_toml, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmgrpc", description="rmgrpc: a GPU and compute resource manager served over gRPC"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--listen", metavar="HOST:PORT", help="gRPC address (127.0.0.1:50051)")
    serve.add_argument("--db", metavar="PATH", help="SQLite database file (rmgrpc.db)")
    serve.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="/metrics address; '' disables it"
    )
    serve.add_argument("--config", metavar="FILE", help="TOML settings file")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub.add_parser("config", help="print every setting with its default, as TOML")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        sys.stdout.write(example_toml())
        return 0
    try:
        settings = load_settings(
            args.config,
            overrides={
                "listen": args.listen,
                "db": args.db,
                "metrics_listen": args.metrics_listen,
                "log_level": args.log_level,
            },
        )
    except ConfigError as exc:
        print(f"rmgrpc: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from rmgrpc.server import StartupError, serve

    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"rmgrpc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
