"""`locdiff serve`: the registered model over HTTP (locdiff.inference.serve: MLflow's scoring server, guarded)."""

from __future__ import annotations

import argparse

from locdiff.cli.args import number_in
from locdiff.inference.serve import DEFAULT_MAX_REQUEST_MB, MAX_REQUEST_MB, serve


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a registered model over HTTP (POST /invocations)",
        description="Serve a LocDiff model with MLflow's scoring protocol (POST /invocations, GET /ping), as "
        "`mlflow models serve` does, behind a guard: JSON bodies only, a size limit checked before the body is "
        "read, and every error answered in one line without a stack trace. Runs until interrupted.")
    p.add_argument("--model", default="models:/locdiff@champion", metavar="MODEL_URI",
                   help="a model URI (default models:/locdiff@champion; MLFLOW_TRACKING_URI, else the local "
                   "store) or a saved MLflow model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number_in(1, 65535), default=5001, help="port (default 5001)")
    p.add_argument("--max-request-mb", type=number_in(1, MAX_REQUEST_MB), default=DEFAULT_MAX_REQUEST_MB,
                   metavar="MB", help=f"largest request body (default {DEFAULT_MAX_REQUEST_MB})")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    serve(args.model, host=args.host, port=args.port, max_request_mb=args.max_request_mb)
    return 0
