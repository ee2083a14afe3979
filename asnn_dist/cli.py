"""``asnn-dist`` command line: parse, load the config, call one function.

User errors (bad config, missing data, unreachable services) print one line and exit non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

from asnn_dist.errors import UserError

BENCHES = {name: f"asnn_dist.bench.{name}" for name in ("neurons", "model", "data", "zero", "train", "tune")}

DEMO_EPILOG = """The demo builds shards from scikit-learn's bundled handwritten digits, trains the
LeNet ASNN with hybrid coding (1 direct + 3 threshold-coded steps) on 2 local Ray workers with
DeepSpeed ZeRO-2, evaluates on the test split and registers the model in MLflow (SQLite file
under the working folder). A second run reuses the shards and the MLflow database."""


class _SetAction(argparse.Action):
    """``--set k=v ...`` that also stands before CONFIG: argparse's ``nargs="+"`` swallows the
    config path too, so a value without '=' is set aside for ``_config_from_set`` to take."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        getattr(namespace, self.dest).extend(v for v in values if "=" in v)
        namespace._set_stray = [*getattr(namespace, "_set_stray", []), *(v for v in values if "=" not in v)]


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """CONFIG and ``--set`` in any order (every config-taking subcommand calls this)."""
    p.add_argument("config", nargs="?", help="experiment YAML (may 'extends' a base file)"
                   + ("" if required else "; default: the embedded defaults"))
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action=_SetAction, default=[],
                   help="dotted overrides, before or after CONFIG, e.g. --set optim.lr=1e-3 run.num_workers=4")
    p.set_defaults(_config_parser=p, _config_required=required)


def _config_from_set(args: argparse.Namespace) -> None:
    """Give CONFIG back from what ``--set`` swallowed; usage errors (exit 2) as argparse's own."""
    parser: Optional[argparse.ArgumentParser] = getattr(args, "_config_parser", None)
    if parser is None:
        return
    stray: list[str] = getattr(args, "_set_stray", [])
    if stray and args.config is None:
        args.config = stray.pop(0)
    if stray:
        parser.error(f"--set expects KEY=VALUE (dotted.key=value, e.g. optim.lr=1e-3), got {stray[0]!r}")
    if args._config_required and args.config is None:
        parser.error("the following arguments are required: config")


def _load(args: argparse.Namespace):
    from asnn_dist.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    from asnn_dist.config import dump_config

    cfg = _load(args)
    if args.action == "show":
        sys.stdout.write(dump_config(cfg))
    else:
        print(f"ok: {args.config} is valid (model {cfg.model.name}, T={cfg.encoding.num_steps}, "
              f"{cfg.run.num_workers} workers, ZeRO {cfg.engine.zero_stage}, global batch {cfg.global_batch_size})")
    return 0


def _print_outcome(outcome, cfg) -> None:
    m = outcome.metrics
    print(f"run {outcome.run_name}: test top-1 {m.get('val_top1', float('nan')):.4f} "
          f"(top-5 {m.get('val_top5', float('nan')):.4f}, {int(m.get('val_count', 0))} samples), "
          f"{m.get('train_images_per_s', 0):.0f} train images/s")
    prefix = "val_anytime_top1_t"
    steps = [m[f"{prefix}{t}"] for t in range(1, 1 + sum(k.startswith(prefix) for k in m))]
    if steps:
        print("anytime top-1 by steps used: " + ", ".join(f"t{i + 1}={v:.3f}" for i, v in enumerate(steps)))
    if outcome.registered_version:
        name = cfg.tracking.registered_model
        moved = f"alias @{cfg.tracking.alias} -> v{outcome.registered_version}" if outcome.alias_moved else \
            f"alias @{cfg.tracking.alias} kept on the better earlier version"
        print(f"registered models:/{name}/{outcome.registered_version} ({moved})")
    print(f"MLflow run {outcome.mlflow_run_id} in {cfg.tracking.uri}")
    print(f"open the UI with:  mlflow ui --backend-store-uri {cfg.tracking.uri}   (then http://127.0.0.1:5000)")


def cmd_train(args: argparse.Namespace) -> int:
    from asnn_dist.train.launcher import run_training

    cfg = _load(args)
    _print_outcome(run_training(cfg), cfg)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from asnn_dist.tune.finish import summary_lines
    from asnn_dist.tune.search import INTERRUPTED_EXIT, run_search

    cfg = _load(args)
    outcome = run_search(cfg)
    if outcome.interrupted:
        return INTERRUPTED_EXIT
    for line in summary_lines(outcome, cfg):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from asnn_dist.config import load_config
    from asnn_dist.train.launcher import run_training

    overrides = [f"workdir={args.workdir}", *args.overrides]
    cfg = load_config(args.config, overrides)
    print(f"asnn-dist demo: working folder {cfg.workdir}")
    _print_outcome(run_training(cfg), cfg)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from asnn_dist.registry import MODELS, list_models

    for name in list_models(args.pattern):
        tags = ",".join(sorted(MODELS.tags(name)))
        print(f"{name}" + (f"  [{tags}]" if tags else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from asnn_dist.inference import evaluate_shards, load_model

    loaded = load_model(args.model, args.tracking_uri, args.device)
    m = evaluate_shards(loaded, args.data, args.split, args.batch_size)
    print(f"{args.model} on {args.data} ({args.split}): top-1 {m['val_top1']:.4f}  top-5 {m['val_top5']:.4f}  "
          f"loss {m['val_loss']:.4f}  ({int(m['val_count'])} samples)")
    prefix = "val_anytime_top1_t"
    steps = [m[f"{prefix}{t}"] for t in range(1, 1 + sum(k.startswith(prefix) for k in m))]
    print("anytime top-1 by steps used: " + ", ".join(f"t{i + 1}={v:.3f}" for i, v in enumerate(steps)))
    if "val_firing_rate/mean" in m:
        print(f"mean firing rate {m['val_firing_rate/mean']:.4f}, {m['val_sops_per_sample']:.3g} SOPs/sample, "
              f"energy {m['val_energy/total_pj'] * 1e-6:.3f} uJ/sample (45 nm convention)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from asnn_dist.inference import load_model, predict_files

    loaded = load_model(args.model, args.tracking_uri, args.device)
    for path, top in zip(args.images, predict_files(loaded, args.images, args.top)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark's ``main(argv)``; its parser's usage line reads ``asnn-dist bench NAME``
    (argparse names a parser without ``prog`` after ``sys.argv[0]``)."""
    module = importlib.import_module(BENCHES[args.bench])
    argv0, sys.argv[0] = sys.argv[0], f"asnn-dist bench {args.bench}"
    try:
        return int(module.main(args.bench_args) or 0)
    finally:
        sys.argv[0] = argv0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asnn-dist", description="Distributed training of Adaptive Spiking Neural "
                                "Networks with hybrid coding (Ray Train + DeepSpeed + MLflow).")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors (anywhere on the command line)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="build digits shards, train on 2 local workers, register the model",
                       description=DEMO_EPILOG)
    d.add_argument("--workdir", default="asnn-work", help="working folder for shards, MLflow and Ray results (default: %(default)s)")
    _add_config_args(d, required=False)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model from a config on Ray Train + DeepSpeed",
                       description="Train CONFIG on a Ray cluster (RAY_ADDRESS) or a local Ray instance; "
                       "a run with the same run.name resumes from its last checkpoint.")
    _add_config_args(t)
    t.set_defaults(func=cmd_train)

    tu = sub.add_parser("tune", help="hyperparameter search: every trial a distributed training run",
                        description="Search CONFIG's tune.space with Ray Tune (ASHA or FIFO; random, grid or "
                        "Optuna TPE); each trial trains on run.num_workers DeepSpeed workers and logs a nested "
                        "MLflow run. Rerunning the same command (same tune.name) resumes the search.")
    _add_config_args(tu)
    tu.set_defaults(func=cmd_tune)

    c = sub.add_parser("config", help="show or check a config", description="Resolve and print (show) or "
                       "validate (check) an experiment config, with its 'extends' chain and overrides.")
    c.add_argument("action", choices=["show", "check"], help="show: print the resolved YAML; check: validate only")
    _add_config_args(c)
    c.set_defaults(func=cmd_config)

    from asnn_dist.data.cli_shards import add_parser as add_shards_parser

    add_shards_parser(sub)  # shards build SOURCE ... / shards digits --out DIR

    m = sub.add_parser("models", help="list registered models", description="List registered models (fnmatch pattern).")
    m.add_argument("pattern", nargs="?", default="*", help="e.g. 'spikformer*' (default: all)")
    m.set_defaults(func=cmd_models)

    model_help = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a run's final checkpoint folder"
    e = sub.add_parser("evaluate", help="evaluate a registered or checkpointed model on shards",
                       description="Top-1/top-5, anytime accuracy per step, firing rates and energy estimate.")
    e.add_argument("--model", required=True, help=model_help)
    e.add_argument("--data", required=True, help="shard folder (with <split>.manifest.json) or a manifest URL")
    e.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    e.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="top-k classes of image files", description="Print the top-k classes "
                        "with probabilities for each image, using a registered or checkpointed model.")
    pr.add_argument("--model", required=True, help=model_help)
    pr.add_argument("images", nargs="+", help="image files (PNG/JPEG)")
    pr.add_argument("--top", type=int, default=5, help="classes to show (default: %(default)s)")
    pr.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    pr.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    pr.set_defaults(func=cmd_predict)

    b = sub.add_parser("bench", help="run a benchmark", description="Benchmarks print ratios measured in one run.")
    b.add_argument("bench", choices=sorted(BENCHES), help="which benchmark")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see its --help)")
    b.set_defaults(func=cmd_bench)
    return p


def _pop_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` out wherever it stands (before or after the subcommand, among a
    benchmark's own arguments), so that every subcommand, present and future, accepts it."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"]
    return kept + argv[end:], len(kept) < end


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv, debug = _pop_debug(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.debug = args.debug or debug
    _config_from_set(args)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"asnn-dist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("asnn-dist: interrupted; a rerun with the same run.name resumes from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
