"""``python -m service.sandbox [--host H] [--port P] [--api-key K]``: serve the sandbox alone."""

from __future__ import annotations

import argparse

from service.sandbox.server import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--api-key", default="sandbox-key")
    args = parser.parse_args(argv)
    run(args.host, args.port, api_key=args.api_key)


if __name__ == "__main__":
    main()
