"""The ``aimodels`` command: publish a model, list the store, serve it, load-test it.

::

    aimodels store publish-example --store store/     # train the digits MLP, publish it
    aimodels store publish-example --store store/ --model tiny-gpt   # chapter 9's GPT
    aimodels store list --store store/                # versions, aliases, metrics
    aimodels serve --store store/ --port 8000         # the v2 inference server
    aimodels loadtest http://127.0.0.1:8000 --model digits --concurrency 8 --requests 500

The same as ``python -m aimodels.serving.cli ...``. ``serve`` runs until SIGTERM or
Ctrl-C, finishing the requests in flight first. Set ``AIMODELS_ADMIN_TOKEN`` to
enable the ``/v2/repository`` admin routes (load, unload, switch a version).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimodels", description="Model store, v2 inference server and load tester."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    store = commands.add_parser("store", help="publish and list models in a model store")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    publish = store_commands.add_parser(
        "publish-example", help="train an example model (digits or tiny-gpt) and publish it"
    )
    publish.add_argument("--model", choices=["digits", "tiny-gpt"], default="digits",
                         help="which example: the digits MLP (default) or chapter 9's tiny "
                         "GPT, served on /v1")
    publish.add_argument("--seconds", type=float, default=30.0,
                         help="tiny-gpt only: training time budget in seconds (default: 30)")
    publish.add_argument("--steps", type=int, default=None,
                         help="tiny-gpt only: train exactly this many steps, which makes the "
                         "model reproducible (default: as many as --seconds allows)")
    publish.add_argument("--store", required=True, help="model store folder (created if missing)")
    publish.add_argument("--name", default=None,
                         help="model name (default: the --model name)")
    publish.add_argument("--hidden", type=int, default=64, help="hidden width (default: 64)")
    publish.add_argument("--depth", type=int, default=1, help="hidden layers (default: 1)")
    publish.add_argument("--epochs", type=int, default=60, help="training epochs (default: 60)")
    publish.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    publish.add_argument("--no-train", action="store_true",
                         help="publish random weights (for cost benchmarks)")
    publish.add_argument("--alias", action="append", default=None,
                         help="alias(es) to point at the new version (default: production)")
    listing = store_commands.add_parser("list", help="list models, versions and aliases")
    listing.add_argument("--store", required=True, help="model store folder")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    serve = commands.add_parser("serve", help="run the v2 inference server (uvicorn)")
    serve.add_argument("--store", required=True, help="model store folder")
    serve.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--model", action="append", default=None,
                       help="serve only this model (repeatable; default: every model with "
                       "a production alias)")
    serve.add_argument("--max-batch-size", type=int, default=16,
                       help="requests per model call (default: 16; 1 = no batching)")
    serve.add_argument("--max-delay-ms", type=float, default=5.0,
                       help="longest wait for a batch to fill (default: 5)")
    serve.add_argument("--max-queue-size", type=int, default=1024,
                       help="queued requests before 503 (default: 1024)")
    serve.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                       help="largest request body (default: 16 MiB)")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch.set_num_threads in the server (default: torch's choice)")
    serve.add_argument("--drift-window", type=int, default=256,
                       help="recent input rows the drift PSI is computed on (default: 256)")
    serve.add_argument("--llm-max-tokens", type=int, default=256,
                       help="largest reply of a language model on /v1 (default: 256)")
    serve.add_argument("--llm-num-blocks", type=int, default=None,
                       help="KV-cache blocks per language model (default: room for "
                       "--llm-max-batch full contexts)")
    serve.add_argument("--llm-max-batch", type=int, default=16,
                       help="sequences decoded together (default: 16)")
    serve.add_argument("--llm-mode", choices=["continuous", "static"], default="continuous",
                       help="batching of the language models (default: continuous)")
    serve.add_argument("--llm-prefix-caching", action="store_true",
                       help="share the KV-cache blocks of prompts that start alike")
    serve.add_argument("--graceful-timeout", type=float, default=30.0,
                       help="seconds to finish in-flight requests on SIGTERM (default: 30)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--access-log", action="store_true", help="log every request")

    commands.add_parser(
        "loadtest", add_help=False,
        help="load-test a server (see `aimodels loadtest --help`)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in `argv` (default: sys.argv[1:]); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "loadtest":  # its own parser owns every option after it
        from aimodels.serving.loadtest import main as loadtest_main

        return loadtest_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.store_command == "publish-example":
        return _publish_example(args)
    return _list(args)


def _publish_example(args: argparse.Namespace) -> int:
    if args.name is None:
        args.name = args.model
    if args.model == "tiny-gpt":
        return _publish_tiny_gpt(args)
    from aimodels.serving.metrics import mean_intensity
    from aimodels.serving.models import digits_arrays, digits_config, train_digits_classifier
    from aimodels.serving.server import DRIFT_REFERENCE_FILE
    from aimodels.serving.store import ModelStore

    model, metrics = train_digits_classifier(
        hidden=args.hidden, depth=args.depth, epochs=args.epochs, seed=args.seed,
        train=not args.no_train,
    )
    # What the drift monitor compares live inputs with: each training image's mean pixel.
    reference = mean_intensity(digits_arrays(args.seed)["X_train"])
    drift_reference = {
        "feature": "mean_intensity",
        "description": "mean pixel value (0-16) of each training image",
        "values": [round(float(v), 6) for v in reference],
    }
    aliases = ["production"] if args.alias is None else args.alias
    store = ModelStore(args.store)
    version = store.publish(
        args.name, model.state_dict(), digits_config(args.hidden, args.depth),
        metrics=metrics, aliases=aliases,
        extra_files={DRIFT_REFERENCE_FILE: json.dumps(drift_reference)},
    )
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"published {args.name} version {version} (aliases: {', '.join(aliases) or 'none'}) "
          f"to {store.root}: {shown}")
    return 0


def _publish_tiny_gpt(args: argparse.Namespace) -> int:
    from aimodels.serving.llm import publish_tiny_gpt
    from aimodels.serving.store import ModelStore

    aliases = ["production"] if args.alias is None else args.alias
    store = ModelStore(args.store)
    start = time.monotonic()
    version = publish_tiny_gpt(store, args.name, seconds=args.seconds, seed=args.seed,
                               aliases=aliases, steps=args.steps)
    metrics = store.info(args.name, version)["metrics"]
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"published {args.name} version {version} (aliases: {', '.join(aliases) or 'none'}) "
          f"to {store.root}: {shown}; {time.monotonic() - start:.1f} s in all")
    return 0


def _list(args: argparse.Namespace) -> int:
    from aimodels.serving.store import ModelStore

    store = ModelStore(args.store)
    rows = []
    for name in store.models():
        for version in store.versions(name):
            info = store.info(name, version)
            rows.append({"name": name, "version": version, "created": info["created"],
                         "aliases": info["aliases"], "metrics": info["metrics"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {store.root}")
        return 0
    print(f"{'model':<16} {'version':>7}  {'created':<29} {'aliases':<20} metrics")
    for row in rows:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(row["metrics"].items()))
        print(f"{row['name']:<16} {row['version']:>7}  {row['created']:<29} "
              f"{','.join(row['aliases']) or '-':<20} {metrics}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from aimodels.serving.server import run_server

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:%(name)s: %(message)s")
    run_server(
        args.store, host=args.host, port=args.port, threads=args.threads,
        graceful_timeout=args.graceful_timeout, log_level=args.log_level,
        access_log=args.access_log, models=args.model, max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms, max_queue_size=args.max_queue_size,
        max_body_bytes=args.max_body_bytes, drift_window=args.drift_window,
        llm_max_tokens=args.llm_max_tokens, llm_num_blocks=args.llm_num_blocks,
        llm_max_batch=args.llm_max_batch, llm_mode=args.llm_mode,
        llm_prefix_caching=args.llm_prefix_caching,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
