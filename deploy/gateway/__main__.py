"""Run the fake payment gateway: ``python -m deploy.gateway --host H --port P --db FILE``.

Fault settings come from the GATEWAY_* environment variables (see GatewayConfig) and can be
changed at run time through ``POST /v1/control``. SIGTERM or SIGINT stops it with exit code 0.
"""

import argparse
import sys
from collections.abc import Sequence

from deploy.gateway.server import GatewayConfig, serve


def _port(raw: str) -> int:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.gateway", description="Fake card processor with a SQLite ledger."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8100, help="0 picks a free port (8100)")
    parser.add_argument(
        "--db", default="var/gateway.sqlite3", help="ledger file (var/gateway.sqlite3)"
    )
    args = parser.parse_args(argv)
    try:
        config = GatewayConfig.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve(args.host, args.port, args.db, config)
    except OSError as exc:
        print(f"gateway: cannot start on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
