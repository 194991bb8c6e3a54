"""`fusion-ray` command line. Thin: parse, load the config, call a stage."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from fusion_ray.config import ALL_STAGES, ConfigError, load_config
from fusion_ray.errors import StageFailed, describe, root_cause

EXIT_FAILED = 1  # a stage (or a command) failed while it ran
EXIT_BAD_INPUT = 2


def cmd_validate(args: argparse.Namespace) -> int:
    from fusion_ray.pipeline import check_stages, pipeline_stages, run_problems

    cfg = load_config(args.config, args.overrides)
    check_stages(cfg, pipeline_stages(cfg))
    problems = run_problems(cfg, pipeline_stages(cfg))
    for line in problems:
        print(f"{args.config}: {line}", file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    print(f"{args.config}: OK ({cfg.name}: pivot {cfg.pivot.name}, "
          f"{len(cfg.sources)} source(s), " + (f"{len(cfg.data.train)} training corpus file(s))"
          if cfg.method == "explicit" else f"{len(cfg.implicit.prompts)} prompt corpus file(s), implicit)"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print what each stage asks for and whether it fits; exit 2 when something cannot."""
    from fusion_ray.plan import make_plan, render

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, source=str(args.config), cluster_path=args.cluster, rows=args.rows, tokens=args.tokens)
    print(render(plan))
    return 0 if plan.ok else EXIT_BAD_INPUT


def cmd_run(args: argparse.Namespace) -> int:
    from fusion_ray.pipeline import check_run, parse_stages, run_stages

    cfg = load_config(args.config, args.overrides)
    stages = [args.command] if args.command in ALL_STAGES else parse_stages(args.stages, cfg)
    if args.stages is None and args.command == "run" and cfg.serve.deploy_after_merge:
        stages.append("serve")
    check_run(cfg, stages)  # before the run's log is opened below the workdir
    with run_log(args, cfg.workdir):
        results = run_stages(cfg, stages, force=args.force, checked=True)
    if "serve" in results and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        serve_until_interrupted(results["serve"].figures["url"])  # a local Ray ends with this process
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fusion_ray import locations

    if locations.kind(args.model_dir) == "local" and not Path(args.model_dir).expanduser().is_dir():
        raise FileNotFoundError(f"model dir not found: {args.model_dir}")
    # the replica runs in a directory of its own: paths made absolute here, on the driver
    args.model_dir = locations.absolute(args.model_dir)
    args.adapter = [(name, locations.absolute(d)) for name, d in args.adapter or []]
    import torch

    from fusion_ray.serve.app import API_KEY_ENV, ServeArgs, deploy

    engine = args.engine or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    serve_args = {"model_dir": args.model_dir, "engine": engine, "host": args.host, "port": args.port,
                  "api_key": args.api_key or os.environ.get(API_KEY_ENV),
                  "num_gpus": 1 if torch.cuda.is_available() else 0,  # one replica, one GPU if any
                  "access_log": not args.no_access_log, "max_request_bytes": args.max_request_bytes,
                  "adapters": dict(args.adapter or [])}
    ServeArgs.model_validate(serve_args).resolved()  # a dir that is no model fails here, before the log opens
    # the engine's and Serve's own lines (and the access log) go to this node's log file
    with run_log(args, str(locations.cache_root())):
        serve_until_interrupted(deploy(serve_args))
    return 0


def name_and_dir(text: str) -> tuple[str, str]:
    """`NAME=DIR` of `serve --adapter`."""
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def serve_until_interrupted(url: str) -> None:
    """Print the base URL, then block until Ctrl-C (or SIGTERM) and shut Serve down."""
    import signal
    import time

    from ray import serve

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"serving at {url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()


def cmd_demo(args: argparse.Namespace) -> int:
    from fusion_ray import locations

    if args.workdir and (why := locations.writable(args.workdir)):
        raise ValueError(why)  # before the assets are built (minutes, the first time)
    from fusion_ray.demo.run import demo_workdir, run_demo

    with run_log(args, demo_workdir(args.workdir)):
        return run_demo(workdir=args.workdir, force=args.force)


@contextlib.contextmanager
def run_log(args: argparse.Namespace, workdir: str):
    """Everything the run prints, and what Ray forwards from its workers, into
    `<workdir>/logs/<command>-<time>.log`; the terminal keeps the stages' own lines
    (`fusion_ray.console`). With `--debug`, no routing."""
    if args.debug:
        yield None
        return
    from fusion_ray import console

    path = console.route(console.log_path(workdir, args.command))
    print(f"[{args.command}] log: {path}", flush=True)
    yield path


def cmd_merge(args: argparse.Namespace) -> int:
    """`merge MERGE_YAML OUT_DIR`: standalone; `merge CONFIG [key=value ...]`: the pipeline stage."""
    if args.out_dir is None or "=" in args.out_dir:
        args.overrides = ([args.out_dir] if args.out_dir else []) + list(args.overrides)
        args.command = "merge"
        if args.seed is not None:
            args.overrides.append(f"merge.seed={args.seed}")
        return cmd_run(args)
    if args.overrides:
        raise ValueError(f"unexpected arguments after OUT_DIR: {' '.join(args.overrides)}")
    from fusion_ray.merge.spec import load_spec

    spec = load_spec(args.config)  # before the engine (torch) is imported: a bad spec fails fast
    from fusion_ray import locations

    args.out_dir = locations.absolute(args.out_dir, path_only=True)  # merge actors run elsewhere
    from fusion_ray.merge.actor import merge_standalone

    stats = merge_standalone(spec, args.out_dir, seed=args.seed or 0, threads=args.threads,
                             num_actors=args.num_actors, force=args.force)
    print(f"merged {stats['tensors']} tensors ({stats['bytes'] / 2**20:.1f} MiB, {stats['shards']} shard(s)) "
          f"with {spec.merge_method} into {stats['dir']} in {stats['wall_s']:.1f}s")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-ray", description=__doc__)
    debug_help = "on an error, show the Python traceback instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # `--debug` after the command works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, parents=[common])
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
        return p

    with_config("validate", "check a config; print every bad field").set_defaults(fn=cmd_validate)
    plan = with_config("plan", "what each stage asks for (CPUs, GPUs, memory, bytes) and whether it fits")
    plan.add_argument("--cluster", help="Ray cluster launcher YAML whose node types must host the stages")
    plan.add_argument("--rows", type=positive_int,
                      help="training rows (default: data.train max_rows, else an estimate)")
    plan.add_argument("--tokens", type=positive_int,
                      help="tokens per row for the logit store (default: data.max_length)")
    plan.set_defaults(fn=cmd_plan)
    run = with_config("run", "run the pipeline (skips finished stages)")
    run.add_argument("--stages", help="comma-separated subset, e.g. collect,align")
    run.add_argument("--force", action="store_true", help="rerun stages even if finished")
    run.set_defaults(fn=cmd_run)
    for stage in ("prepare", "collect", "align", "fuse", "train", "eval", "sample"):
        p = with_config(stage, f"run the {stage} stage alone")
        p.add_argument("--force", action="store_true")
        p.set_defaults(fn=cmd_run, stages=None)
    merge = sub.add_parser("merge", parents=[common],
                           help="merge models: `merge MERGE_YAML OUT_DIR` (mergekit-style YAML), "
                           "or `merge CONFIG` (the pipeline's merge stage)")
    merge.add_argument("config", help="mergekit-style merge YAML, or a pipeline config")
    merge.add_argument("out_dir", nargs="?", help="output model dir (standalone merge)")
    merge.add_argument("overrides", nargs="*", help="key=value overrides (pipeline config)")
    merge.add_argument("--seed", type=int, default=None, help="seed of DARE masks (default 0)")
    merge.add_argument("--threads", type=positive_int, default=None, help="tensors merged in parallel (standalone)")
    merge.add_argument("--num-actors", type=positive_int, default=1,
                       help="Ray actors sharing the tensors (standalone)")
    merge.add_argument("--force", action="store_true",
                       help="replace an earlier merge's output (never a dir no merge wrote) / rerun the stage")
    merge.set_defaults(fn=cmd_merge)
    serve = sub.add_parser("serve", parents=[common], help="serve a chat model behind an OpenAI-compatible API")
    serve.add_argument("model_dir")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--engine", choices=["vllm", "hf"], default=None,
                       help="default: vllm when it is installed, else hf")
    serve.add_argument("--api-key", default=None,
                       help="require this bearer token (default: $FUSION_RAY_API_KEY; none: open)")
    serve.add_argument("--no-access-log", action="store_true", help="no log line per request")
    serve.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                       help="larger request bodies are answered 413 (default 4 MiB)")
    serve.add_argument("--adapter", action="append", type=name_and_dir, metavar="NAME=DIR",
                       help="also serve the LoRA adapter in DIR (trained on MODEL_DIR) as model NAME; repeatable")
    serve.set_defaults(fn=cmd_serve)
    demo = sub.add_parser("demo", parents=[common], help="build the offline demo assets and run every pipeline stage")
    demo.add_argument("--workdir", default=None, help="where stage outputs go")
    demo.add_argument("--force", action="store_true")
    demo.set_defaults(fn=cmd_demo)
    return parser


# Errors that bad input causes (a config, a corpus, a path, an argument): one line, exit 2.
INPUT_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
                ValueError)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input ends in one line on stderr and exit 2; `--debug` shows the
    traceback instead."""
    from pydantic import ValidationError

    from fusion_ray import progress
    from fusion_ray.config import format_errors

    progress.quiet_progress()  # off a terminal, no progress bars (before the libraries are imported)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except ConfigError as err:
        if args.debug:
            raise
        where = f"[{args.command}] " if args.command in ALL_STAGES else ""  # a stage's own command
        print(f"{where}invalid config {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationError as err:  # arguments checked by a pydantic model (serve's)
        if args.debug:
            raise
        print(f"error: {err.title}: " + "; ".join(format_errors(err)), file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageFailed as err:  # the worker tracebacks are in the file the line names
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        bad_input = err.__cause__ is not None and isinstance(root_cause(err.__cause__), INPUT_ERRORS)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
    except INPUT_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - anything else: one line too, the traceback with --debug
        if args.debug:
            raise
        print(f"error: {args.command}: {describe(err)} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
