"""`rmgrpc`: the server's command line (`rmgrpc serve`, `rmgrpc config`)."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys

from rmgrpc.config import ConfigError, example_toml, load_settings

# What `serve --dev` changes: simulated nodes, so a laptop with no GPU has a cluster.
# They are defaults, so a config file, the environment or a flag still win.
DEV_DEFAULTS = {"simulated_nodes": 4}


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
    serve.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow a non-loopback address with no authentication (warned at every start)",
    )
    hash_token = sub.add_parser(
        "hash-token",
        help="print the token_sha256 of a token read from stdin, for the tokens file",
    )
    hash_token.add_argument(
        "--generate", action="store_true", help="make a new random token and print it too"
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        help=f"dev mode: {DEV_DEFAULTS['simulated_nodes']} simulated nodes unless the config "
        "or RMGRPC_SIMULATED_NODES says otherwise (production serves only real nodes)",
    )
    sub.add_parser("config", help="print every setting with its default, as TOML")
    return parser


def _hash_token(generate: bool) -> int:
    """`rmgrpc hash-token`: what the tokens file stores (the token itself never is)."""
    from rmgrpc.auth import hash_token

    if generate:
        token = secrets.token_urlsafe(32)
        print(f"token = {token}")
        print(f'token_sha256 = "{hash_token(token)}"')
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        print("rmgrpc: hash-token reads the token from stdin (or use --generate)", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        sys.stdout.write(example_toml())
        return 0
    if args.command == "hash-token":
        return _hash_token(args.generate)
    try:
        settings = load_settings(
            args.config,
            overrides={
                "listen": args.listen,
                "db": args.db,
                "metrics_listen": args.metrics_listen,
                "log_level": args.log_level,
                "insecure": args.insecure,
            },
            defaults=DEV_DEFAULTS if args.dev else None,
        )
    except ConfigError as exc:
        print(f"rmgrpc: {exc}", file=sys.stderr)
        return 2
    from rmgrpc.telemetry import setup_logging

    # logfmt lines on stderr, with the trace id inside a span (see README, Operating it).
    setup_logging(settings.log_level)
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
