"""Training throughput benchmark: one Ray Train + DeepSpeed worker vs a plain PyTorch loop.

Run: ``asnn-dist bench train [--epochs 6] [--local-epochs 4] [--repeats 1] [--set k=v]``.
Ray side: the real path, ``run_training(load_config(None, overrides))`` with one worker, a
local Ray, digits shards and an MLflow SQLite file in a temporary workdir, spike statistics,
progress bar and model registration off, all else at the project's defaults (so the worker
logs to MLflow every ``run.log_every_steps=10`` steps, as users' runs do). Plain side: a
single-process loop with the same model and seed, ShardLoader settings (the worker's own
``_make_loaders``), batch size, optimizer (``build_optimizer``), learning-rate schedule, masked
loss and threads (1). A third side (unless ``--no-local-deepspeed``) runs the worker's
DeepSpeed engine and step code on a one-rank gloo group without Ray or MLflow: it splits the
overhead into DeepSpeed's share and Ray's + logging's share.

Rates are steady state: images/s per epoch as the worker defines it (valid samples / time
from the start of the epoch's loader loop to the end of its last step; start-up, evaluation
and checkpoints fall outside). For the Ray side they are the ``train_images_per_s`` values the
worker logs with its epoch-end evaluation (the last one is also ``out.metrics``). Epoch 0 is
dropped everywhere and medians are compared: overhead = 1 - rate / plain rate. On a shared,
noisy machine the local sides alternate epoch by epoch, in blocks before and after each Ray
run (``--repeats``); medians pool all blocks. Each block runs in a fresh Python process, as
the Ray worker and a user's script do: glibc's malloc state matters here. A fresh process
unmaps freed blocks above its (dynamic) mmap threshold and faults them in again on every step
(system CPU); once any block of tens of MB has been freed, e.g. after ``ray.init`` in this
process, the threshold is raised and the same loop runs 25-40 % faster. So by default every
side runs with the fixed thresholds the training workers get (``MALLOC_ENV``, from
``train.ray_setup.WORKER_ENV``): the same allocator regime on both sides of the ratio.
``--malloc default`` gives the local sides glibc's defaults instead (the Ray worker keeps its
thresholds, so that run mixes regimes).

Beside the rates: CPU and system seconds per epoch (training + evaluation, for the Ray worker
also checkpoint + report, sampled from outside with psutil), which tell extra work from
waiting for a core; the CPU share the Ray worker got and the share Ray's other processes took;
the wall time per Ray epoch outside the rate (evaluation, checkpoint, ``ray.train.report``);
and the cost of one MLflow ``log_metrics`` call on the same store, synchronous and as the
worker makes it inside its training loop (handed to its background logger).

With one worker, the configured ZeRO-1/2 runs as stage 0 where that trains the same weights
(``deepspeed_config.run_stage``: fp32, adamw/sgd, no clipping, CPU); the side names say so
("ZeRO-2 as 0"). Both DeepSpeed sides go through ``build_engine`` and get it, as a user's run does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from asnn_dist.bench.common import (CpuSampler, close_local_group, format_table, local_group, median,
                                    quiet_libraries)
from asnn_dist.train.ray_setup import WORKER_ENV

if TYPE_CHECKING:
    from torch import nn

    from asnn_dist.config import ExperimentConfig

PLAIN, LOCAL_DS, RAY = "plain pytorch", "deepspeed, no Ray", "Ray Train + deepspeed"
# fixed glibc thresholds: freed memory stays mapped instead of faulting in again every step
MALLOC_ENV = {k: v for k, v in WORKER_ENV.items() if k.startswith("MALLOC_")}
RESULT_TAG = "ASNN_BENCH_BLOCK "


@dataclass
class SideResult:
    """Per-epoch images/s, evaluation seconds and CPU seconds of one way of training."""

    name: str
    rates: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # per epoch: training + evaluation (+ report)
    sys_s: list[float] = field(default_factory=list)  # the system (kernel) part of cpu_s
    extra: dict[str, Any] = field(default_factory=dict)


def stage_label(cfg: "ExperimentConfig") -> str:
    """'ZeRO-2', or 'ZeRO-2 as 0' where one rank runs as stage 0 (``deepspeed_config.run_stage``)."""
    from asnn_dist.train.deepspeed_config import run_stage

    stage = run_stage(cfg, 1)
    return f"ZeRO-{cfg.engine.zero_stage}" + (f" as {stage}" if stage != cfg.engine.zero_stage else "")


def bench_config(workdir: str, epochs: int, zero_stage: int, model: str,
                 overrides: Sequence[str] = ()) -> "ExperimentConfig":
    """The ExperimentConfig every side uses (building the digits shards once, quietly)."""
    from asnn_dist.config import load_config
    from asnn_dist.data.sources import build_digits_shards

    cfg = load_config(None, [
        f"workdir={workdir}", "run.num_workers=1", "run.spike_stats=false", "run.progress=false",
        "run.threads_per_worker=1", "run.cpus_per_worker=1", f"optim.epochs={epochs}",
        f"engine.zero_stage={zero_stage}", f"model.name={model}", "tracking.registered_model=null",
        "tracking.experiment=asnn-bench-train", "name=bench-train", *overrides])
    if cfg.data.source == "digits":
        build_digits_shards(cfg.data.root, samples_per_shard=cfg.data.samples_per_shard, seed=cfg.seed,
                            progress=False)
    return cfg


# ---- the local sides ----------------------------------------------------------------------
class LocalSide:
    """One way of training in this process, run one epoch at a time (for interleaving)."""

    def __init__(self, cfg: "ExperimentConfig", name: str, model: "nn.Module",
                 step_fn: Callable[[Any, float], float]) -> None:
        from asnn_dist.train.worker import _make_loaders

        self.cfg, self.model, self.step_fn = cfg, model, step_fn
        self.result = SideResult(name)
        self.train, self.val, _ = _make_loaders(cfg, 0, 1)
        o = cfg.optim
        self.steps_per_epoch = len(self.train) // o.grad_accum_steps
        self.total_steps = self.steps_per_epoch * o.epochs
        self.step = self.epoch = 0

    def run_epoch(self) -> None:
        """Trainer.run's loop and rate definition, then an untimed evaluation."""
        from asnn_dist.train.metrics import evaluate_with_stats
        from asnn_dist.train.schedule import lr_at

        o = self.cfg.optim
        micro_per_epoch = self.steps_per_epoch * o.grad_accum_steps
        self.train.set_epoch(self.epoch)
        self.model.train()
        c0, t0, seen = os.times(), time.perf_counter(), 0
        for micro, batch in enumerate(self.train):
            if micro >= micro_per_epoch:
                break
            lr = lr_at(self.step, self.total_steps, o.lr, o.warmup_steps, o.min_lr, o.schedule)
            self.step_fn(batch, lr)
            seen += int(batch[2].sum())
            if (micro + 1) % o.grad_accum_steps == 0:
                self.step += 1
            if micro + 1 >= micro_per_epoch:
                break
        self.result.rates.append(seen / max(time.perf_counter() - t0, 1e-9))
        t1 = time.perf_counter()
        metrics = evaluate_with_stats(self.model, self.val, self.model.num_steps, False)
        self.result.eval_s.append(time.perf_counter() - t1)
        c1 = os.times()
        self.result.cpu_s.append(c1.user + c1.system - c0.user - c0.system)
        self.result.sys_s.append(c1.system - c0.system)
        self.result.extra["val_top1"] = metrics.get("val_top1")
        self.epoch += 1


def plain_side(cfg: "ExperimentConfig") -> LocalSide:
    """Plain PyTorch: forward, masked loss, backward, optimizer step (with accumulation)."""
    import torch

    from asnn_dist.models.build import model_from_config
    from asnn_dist.train.deepspeed_config import build_optimizer
    from asnn_dist.train.worker import masked_loss

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    o, count = cfg.optim, [0]

    def step(batch, lr: float) -> float:
        images, labels, valid = batch[:3]
        for group in opt.param_groups:
            group["lr"] = lr
        loss = masked_loss(model(images), labels, valid, o.label_smoothing)
        (loss / o.grad_accum_steps).backward()
        count[0] += 1
        if count[0] % o.grad_accum_steps == 0:
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # the worker does the same (free on CPU)

    return LocalSide(cfg, PLAIN, model, step)


def local_deepspeed_side(cfg: "ExperimentConfig") -> LocalSide:
    """The worker's engine (same config builder) and ``train_micro_batch``, without Ray
    (needs a process group: ``run_local_block`` makes a one-rank one)."""
    import torch

    from asnn_dist.models.build import model_from_config
    from asnn_dist.train.deepspeed_config import build_engine
    from asnn_dist.train.worker import masked_loss

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg)
    engine, optimizer = build_engine(cfg, model, 1)

    def step(batch, lr: float) -> float:
        images, labels, valid = batch[:3]
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = masked_loss(engine(images), labels, valid, cfg.optim.label_smoothing)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    side = LocalSide(cfg, f"{LOCAL_DS} ({stage_label(cfg)})", engine.module, step)
    side.result.extra["engine"] = engine
    return side


def run_local_block(cfg: "ExperimentConfig", epochs: int, with_deepspeed: bool) -> list[SideResult]:
    """Fresh local sides in this process, trained ``epochs`` epochs each, alternating by epoch."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(cfg.run.threads_per_worker)
    own_group = with_deepspeed and not dist.is_initialized()
    if own_group:
        local_group()
    try:
        sides = [plain_side(cfg)] + ([local_deepspeed_side(cfg)] if with_deepspeed else [])
        torch.manual_seed(cfg.seed)  # Trainer.restore reseeds a fresh run (rank 0) the same way
        for _ in range(epochs):
            for side in sides:
                side.run_epoch()
        for side in sides:
            engine = side.result.extra.pop("engine", None)
            if engine is not None:
                engine.destroy()
    finally:
        if own_group:
            close_local_group()
    return [s.result for s in sides]


def run_local_block_process(cfg: "ExperimentConfig", epochs: int, with_deepspeed: bool,
                            env: Optional[dict[str, str]] = None) -> list[SideResult]:
    """``run_local_block`` in a fresh Python process: a new process's allocator state, like the
    Ray worker's and like a user's own training script (this process has run Ray)."""
    spec = json.dumps({"cfg": cfg.model_dump(mode="json"), "epochs": epochs, "deepspeed": with_deepspeed})
    code = "from asnn_dist.bench.train import _block_child; _block_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=spec, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise RuntimeError(f"local benchmark block failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return [SideResult(**item) for item in json.loads(lines[-1][len(RESULT_TAG):])]


def _block_child() -> None:
    """Entry of ``run_local_block_process``: spec as JSON on stdin, results as one tagged line."""
    from asnn_dist.config import ExperimentConfig

    quiet_libraries()
    spec = json.loads(sys.stdin.read())
    results = run_local_block(ExperimentConfig.model_validate(spec["cfg"]), spec["epochs"], spec["deepspeed"])
    print(RESULT_TAG + json.dumps([asdict(r) for r in results]), flush=True)


# ---- the Ray side ---------------------------------------------------------------------------
def bench_ray_init_kwargs(cfg: "ExperimentConfig", env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """``init_ray``'s local instance, so the Ray side measures what ``asnn-dist train`` runs:
    the same keywords, except that the workers' logs stay out of the report, at least 2 CPUs,
    and ``env`` added to the workers' environment."""
    from asnn_dist.train.ray_setup import local_ray_init_kwargs

    kwargs = local_ray_init_kwargs(cfg, log_to_driver=False)
    kwargs["num_cpus"] = max(kwargs["num_cpus"], 2)
    kwargs["runtime_env"]["env_vars"].update(env or {})
    return kwargs


def run_ray(cfg: "ExperimentConfig", env: Optional[dict[str, str]] = None) -> SideResult:
    """``run_training`` with one worker; per-epoch rates and log times read back from MLflow."""
    import ray
    from mlflow.tracking import MlflowClient

    from asnn_dist.train.launcher import run_training

    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    if started_here and not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        ray.init(**bench_ray_init_kwargs(cfg, env))
    try:
        # 1 s samples: at 0.2 s the sampler itself took ~2.6% of a core from the run it measures
        # (~0.6% at 1 s); CPU use is steady within an epoch, so interpolation stays accurate.
        with CpuSampler(interval_s=1.0) as sampler:
            out = run_training(cfg)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t0
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    # The epoch-end evaluation logs "epoch" and the epoch's rate in one batch (same timestamp);
    # per-step logs of train_images_per_s (every run.log_every_steps) have other timestamps.
    ends = {(m.step, m.timestamp) for m in client.get_metric_history(out.mlflow_run_id, "epoch")}
    per_epoch = sorted((m.timestamp, m.value) for m in
                       client.get_metric_history(out.mlflow_run_id, "train_images_per_s")
                       if (m.step, m.timestamp) in ends)
    res = SideResult(f"{RAY} ({stage_label(cfg)})", rates=[v for _, v in per_epoch])
    stamps = [t / 1000.0 for t, _ in per_epoch]
    # Between consecutive epoch-end logs: report + checkpoint, training, evaluation (epochs >= 1).
    windows = list(zip(stamps, stamps[1:]))
    res.cpu_s = [0.0] + [sampler.cpu_between(a, b, "RayTrainWorker") for a, b in windows]
    res.sys_s = [0.0] + [sampler.cpu_between(a, b, "RayTrainWorker", system_only=True) for a, b in windows]
    span = max(stamps[-1] - stamps[0], 1e-9) if len(stamps) > 1 else float("nan")
    res.extra.update(run_id=out.mlflow_run_id, wall_s=wall, epoch_wall_s=[b - a for a, b in zip(stamps, stamps[1:])],
                     final_rate=out.metrics.get("train_images_per_s"), val_top1=out.metrics.get("val_top1"),
                     worker_core=sum(res.cpu_s) / span,
                     others_core=sampler.cpu_between(stamps[0], stamps[-1], exclude="RayTrainWorker") / span)
    return res


def mlflow_log_cost(cfg: "ExperimentConfig", calls: int = 20) -> tuple[float, float]:
    """Median seconds of one per-step log of the worker's metrics on the store: a synchronous
    ``RunLogger.log_metrics`` call (MLflow's own cost), and the ``BackgroundRunLogger`` call the
    worker makes in its loop (spaced like the worker's calls, so each finds the thread idle)."""
    from mlflow.tracking import MlflowClient

    from asnn_dist.tracking.client import BackgroundRunLogger, RunLogger

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.create_run(exp.experiment_id, run_name="bench-train-log-cost")
    logger = RunLogger(cfg.tracking.uri, run.info.run_id)
    sync, background = [], []
    for i in range(calls):
        t0 = time.perf_counter()
        logger.log_metrics({"train_loss": 1.0 / (i + 1), "lr": 1e-3, "train_images_per_s": 100.0 + i}, i)
        sync.append(time.perf_counter() - t0)
    with BackgroundRunLogger(logger) as bg:
        for i in range(calls):
            t0 = time.perf_counter()
            bg.log_metrics({"train_loss": 1.0 / (i + 1), "lr": 1e-3, "train_images_per_s": 100.0 + i}, calls + i)
            background.append(time.perf_counter() - t0)
            bg.flush()
    client.set_terminated(run.info.run_id)
    return median(sync), median(background)


# ---- orchestration and report ----------------------------------------------------------------
@dataclass
class Report:
    sides: list[SideResult]
    train_samples: int
    steps_per_epoch: int
    log_every_steps: int
    log_call_s: float  # one synchronous RunLogger.log_metrics call
    log_enqueue_s: float  # the worker's BackgroundRunLogger.log_metrics call
    load: tuple[float, float]

    def rate(self, prefix: str) -> float:
        """Median of the steady-state epochs (epoch 0 of each run dropped) of matching sides."""
        return median(r for s in self.sides if s.name.startswith(prefix) for r in s.rates[1:])


def run_benchmark(workdir: str, epochs: int = 6, local_epochs: int = 4, zero_stage: int = 2,
                  model: str = "lenet_asnn", overrides: Sequence[str] = (), local_deepspeed: bool = True,
                  repeats: int = 1, malloc_env: bool = True) -> Report:
    """Local block, then ``repeats`` x (Ray run, local block); every side's per-epoch numbers.
    Each local block runs in a fresh process; ``malloc_env`` gives every side ``MALLOC_ENV``."""
    from asnn_dist.train.worker import _make_loaders

    quiet_libraries()
    cfg = bench_config(workdir, epochs, zero_stage, model, overrides)
    local_cfg = cfg.model_copy(deep=True)
    local_cfg.optim.epochs = local_epochs
    env = dict(MALLOC_ENV) if malloc_env else {}
    load_before = os.getloadavg()[0]
    sides = run_local_block_process(local_cfg, local_epochs, local_deepspeed, env)
    for _ in range(repeats):
        sides.append(run_ray(cfg, env))
        sides += run_local_block_process(local_cfg, local_epochs, local_deepspeed, env)
    train = _make_loaders(cfg, 0, 1)[0]
    log_s = mlflow_log_cost(cfg)
    return Report(sides, train.manifest.num_samples, len(train) // cfg.optim.grad_accum_steps,
                  cfg.run.log_every_steps, log_s[0], log_s[1], (load_before, os.getloadavg()[0]))


def format_report(rep: Report) -> str:
    """The per-run table, the summary with overheads, and the costs outside the rates."""
    plain = rep.rate(PLAIN)
    rows = [[s.name, " ".join(f"{r:.0f}" for r in s.rates), median(s.rates[1:]),
             f"{100 * (1 - median(s.rates[1:]) / plain):+.1f}%", median(s.eval_s) if s.eval_s else "-",
             median(s.cpu_s[1:]), median(s.sys_s[1:])] for s in rep.sides]
    lines = [format_table(["side (run order)", "images/s per epoch", "median ep>=1", "vs plain", "eval s/epoch",
                           "CPU s/epoch", "sys s/epoch"], rows), ""]
    summary = []
    for prefix in (PLAIN, LOCAL_DS, RAY):
        names = [s.name for s in rep.sides if s.name.startswith(prefix)]
        if names:
            r = rep.rate(prefix)
            n = sum(max(len(s.rates) - 1, 0) for s in rep.sides if s.name.startswith(prefix))
            summary.append([names[0], n, r, "-" if prefix == PLAIN else f"{100 * (1 - r / plain):+.1f}%"])
    lines += [format_table(["side", "epochs", "median images/s", "overhead vs plain"], summary), ""]
    plain_eval = median(x for s in rep.sides if s.name.startswith(PLAIN) for x in s.eval_s)
    for ray in (s for s in rep.sides if s.name.startswith(RAY)):
        epoch_end = [w - rep.train_samples / r for w, r in zip(ray.extra["epoch_wall_s"], ray.rates[1:])]
        lines.append(f"Ray run: {ray.extra['wall_s']:.1f} s wall for {len(ray.rates)} epochs (start-up included); "
                     f"per epoch outside the rate (evaluation + checkpoint + report): {median(epoch_end):.2f} s "
                     f"(plain evaluation: {plain_eval:.2f} s); out.metrics train_images_per_s "
                     f"{ray.extra['final_rate']:.0f}, val_top1 {ray.extra['val_top1']:.3f}; steady state: "
                     f"the worker used {100 * ray.extra['worker_core']:.0f}% of a core, Ray's other processes "
                     f"{100 * ray.extra['others_core']:.0f}% of a core")
    calls = rep.steps_per_epoch // rep.log_every_steps
    plain_s = rep.train_samples / plain
    lines.append(f"MLflow log_metrics on SQLite: {1000 * rep.log_call_s:.1f} ms a synchronous call, "
                 f"{1000 * rep.log_enqueue_s:.2f} ms for the worker (background logger); run.log_every_steps="
                 f"{rep.log_every_steps} makes {calls} calls per {rep.steps_per_epoch}-step epoch inside the "
                 f"timed loop = {100 * calls * rep.log_enqueue_s / plain_s:.2f}% of a plain epoch ({plain_s:.2f} s; "
                 f"synchronous: {100 * calls * rep.log_call_s / plain_s:.1f}%)")
    lines.append(f"1-min load average before/after: {rep.load[0]:.2f}/{rep.load[1]:.2f} "
                 f"({os.cpu_count()} CPUs; above ~1 other work shared the cores and the rates are noisy)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asnn-dist bench train", description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Timings on a shared machine are noisy; raise --epochs/--repeats for stabler medians.")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the Ray run (default 6; epoch 0 dropped)")
    parser.add_argument("--local-epochs", type=int, default=4,
                        help="epochs per local side in each block (default 4; epoch 0 dropped)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Ray runs, each followed by another local block (default 1: local, Ray, local)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3],
                        help="DeepSpeed ZeRO stage (default 2, as the demo)")
    parser.add_argument("--model", default="lenet_asnn", help="registered model (default lenet_asnn)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further config overrides, e.g. optim.micro_batch_size=64 run.log_every_steps=1000")
    parser.add_argument("--no-local-deepspeed", dest="local_deepspeed", action="store_false",
                        help="skip the in-process DeepSpeed side (Ray vs plain only)")
    parser.add_argument("--malloc", choices=["worker", "default"], default="worker",
                        help="local sides' glibc malloc: the workers' " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
                        + " (default: no page faults per step, as in the Ray worker) or glibc's defaults")
    parser.add_argument("--workdir", default=None,
                        help="keep shards, mlflow.db and Ray results here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.local_epochs < 2 or args.repeats < 1:
        parser.error("--epochs and --local-epochs must be >= 2 (epoch 0 is warm-up), --repeats >= 1")
    with tempfile.TemporaryDirectory(prefix="asnn-bench-train-") as tmp:
        rep = run_benchmark(args.workdir or tmp, args.epochs, args.local_epochs, args.zero_stage, args.model,
                            args.overrides, args.local_deepspeed, args.repeats, args.malloc == "worker")
    print(f"one worker, {args.model}, ZeRO-{args.zero_stage}, fp32 AdamW, {rep.train_samples} training samples, "
          f"{rep.steps_per_epoch} steps per epoch, 1 thread per side, glibc malloc "
          + ("with the workers' thresholds on every side" if args.malloc == "worker" else "defaults on the local sides"))
    print(format_report(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
