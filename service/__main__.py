"""`python -m service [--host H] [--port P] [--workers N]`: serve with settings from `RA_*` environment variables
(`RA_HOST`, `RA_PORT`, `RA_WORKERS` give the defaults of the three options)."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("RA_HOST", "127.0.0.1"),
                        help="bind address (default RA_HOST or 127.0.0.1; 0.0.0.0 in the container image)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("RA_PORT", "8000")),
                        help="port (default RA_PORT or 8000)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("RA_WORKERS", "1")),
                        help="serving processes on this port, each with its own engine, all following the same "
                             "registry of record (default RA_WORKERS or 1)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if os.environ.get("RA_API_KEYS_FILE"):  # refuse a bad keys file before any worker starts
        from service.access import KeysFileError, load_keys

        try:
            load_keys(pathlib.Path(os.environ["RA_API_KEYS_FILE"]))
        except KeysFileError as exc:
            parser.exit(2, f"python -m service: {exc}\n")
    # every worker process reads its settings from the environment
    os.environ.update(RA_WORKERS=str(args.workers), RA_HOST=args.host, RA_PORT=str(args.port))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
