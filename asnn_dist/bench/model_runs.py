"""The measurements of ``bench model`` that run in a fresh process each (one JSON line out).

Why a fresh process per measurement: peak memory is the process high-water mark (VmHWM),
which only a new process reports for one configuration alone; and one configuration's
allocator state or thread pools cannot slow down the next.

Kinds (``spec["kind"]``):
- ``train``: the engine path of ``asnn-dist train`` on one rank: a DeepSpeed engine built by
  ``train.deepspeed_config.build_engine`` from the demo config with ``engine.precision`` fp32
  or bf16 (bf16: DeepSpeed's bf16 engine, bf16 parameters and fp32 master weights; no
  autocast) and ``engine.zero_stage`` (default 2, which one fp32 rank runs as ZeRO-0, as
  training does); synthetic batch, AdamW, ``warmup`` steps then ``iters`` timed steps
  (forward, cross-entropy, engine backward and step); images/s from the fastest step (on a
  shared machine the least disturbed one; every step time is returned too).
- ``infer``: eval mode under ``torch.inference_mode``, parameters in the row's precision as the
  engine casts them (``snn.precision.cast_params``), same timing rule.
- ``peak``: dense square matmul FLOP/s (fp32 and bf16), the best of several repeats.
- ``accuracy``: the digits demo trained by ``asnn-dist train`` itself (its built-in config: LeNet
  ASNN, hybrid coding, 2 Ray Train workers, ZeRO-2), with ``engine.precision`` fp32 and bf16
  for each seed; test accuracy (MLflow's ``val_top1``) of each and their paired difference.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from asnn_dist.models.execution import apply_time_checkpointing
from asnn_dist.registry import create_model
from asnn_dist.snn.precision import PRECISION_DTYPES, cast_params


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (VmHWM), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model(spec: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(
        spec["model"], image_size=spec["image_size"], num_classes=spec["num_classes"],
        encoding=dict(num_steps=spec["steps"], direct_steps=1, scheme="threshold"),
    )
    return apply_time_checkpointing(model, spec.get("segment", 0), spec.get("levels", 2), spec.get("states"))


def _batch(spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size, b = spec["image_size"], spec["batch"]
    return torch.rand(b, 3, size, size, generator=g), torch.randint(0, spec["num_classes"], (b,), generator=g)


def _time(step, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _engine(spec: dict[str, Any], model: torch.nn.Module) -> Any:
    """A one-rank DeepSpeed engine for ``model`` as ``asnn-dist train`` builds it (CPU, gloo)."""
    from asnn_dist.bench.common import local_group, quiet_libraries
    from asnn_dist.config import load_config
    from asnn_dist.train.deepspeed_config import build_engine

    quiet_libraries()  # a CPU run: DeepSpeed's CPU accelerator
    cfg = load_config(None, [f"engine.precision={spec['precision']}", f"engine.zero_stage={spec.get('zero_stage', 2)}",
                             "optim.name=adamw", "optim.lr=1e-4", f"optim.micro_batch_size={spec['batch']}",
                             "run.num_workers=1"])
    import torch.distributed as dist

    if not dist.is_initialized():  # a fresh child process (tests run several in one)
        local_group()
    engine, _ = build_engine(cfg, model, 1)
    return engine


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    engine = _engine(spec, _model(spec).train())
    x, y = _batch(spec)  # fp32 images: the engine's model casts after its encoder

    def step() -> None:
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()

    out = _result(_time(step, spec["warmup"], spec["iters"]))
    out["zero_stage"] = engine.zero_optimization_stage()
    out["param_dtype"] = str(next(engine.module.parameters()).dtype)
    engine.destroy()
    return out


def _result(times: list[float]) -> dict[str, Any]:
    return {"step_s": min(times), "median_s": statistics.median(times), "times": times, "peak_mib": peak_rss_mib()}


def run_infer(spec: dict[str, Any]) -> dict[str, Any]:
    model = cast_params(_model(spec).eval(), PRECISION_DTYPES[spec["precision"]])
    x, _ = _batch(spec)

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return _result(_time(step, spec["warmup"], spec["iters"]))


def run_peak(spec: dict[str, Any]) -> dict[str, Any]:
    n, out = spec.get("size", 2048), {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        times = _time(lambda: torch.mm(a, b), 2, spec.get("repeats", 8))
        out[f"{name}_gflops"] = 2 * n**3 / min(times) / 1e9
    return out


def demo_config_file(folder: str) -> str:
    """The digits demo config the CLI documents (configs/demo/digits-lenet-hybrid.yaml in a
    source checkout; otherwise the same built-in defaults written to ``folder``)."""
    repo = Path(__file__).resolve().parents[2] / "configs" / "demo" / "digits-lenet-hybrid.yaml"
    if repo.is_file():
        return str(repo)
    from asnn_dist.config import dump_config, load_config

    path = Path(folder, "digits-demo.yaml")
    path.write_text(dump_config(load_config(None)))
    return str(path)


def _train_cli(config: str, workdir: str, precision: str, seed: int, epochs: int) -> float:
    """One ``asnn-dist train`` run of the demo config; its test top-1 as MLflow recorded it."""
    from mlflow.tracking import MlflowClient

    name = f"acc-{precision}-s{seed}-{int(time.time())}"
    cmd = [sys.executable, "-m", "asnn_dist.cli", "train", config, "--set", f"workdir={workdir}", f"seed={seed}",
           f"engine.precision={precision}", f"optim.epochs={epochs}", f"run.name={name}", "run.progress=false",
           "tracking.registered_model=null"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}  # the CLI's own setup
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"asnn-dist train ({precision}, seed {seed}) failed: {tail}")
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(workdir).resolve()}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name("asnn-demo").experiment_id,
                              filter_string=f"tags.`asnn.run_name` = '{name}'", max_results=1)
    return float(runs[0].data.metrics["val_top1"])


def run_accuracy(spec: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy per seed of the digits demo trained by ``asnn-dist train`` in fp32 and in
    bf16 (one seed's run is noisy on 360 test images, so several are averaged and the per-seed
    differences give the paired comparison). Seeds alternate precisions, so a busy spell on a
    shared machine hits both alike."""
    out: dict[str, Any] = {"fp32_accs": [], "bf16_accs": [], "fp32_s": 0.0, "bf16_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="asnn-bench-acc-") as workdir:
        config = demo_config_file(workdir)
        for seed in range(spec["seeds"]):
            for precision in ("fp32", "bf16"):
                t0 = time.perf_counter()
                out[f"{precision}_accs"].append(_train_cli(config, workdir, precision, seed, spec["epochs"]))
                out[f"{precision}_s"] += time.perf_counter() - t0
    for precision in ("fp32", "bf16"):
        out[f"{precision}_acc"] = statistics.mean(out[f"{precision}_accs"])
    diffs = [b - a for a, b in zip(out["fp32_accs"], out["bf16_accs"])]
    out["diff"] = statistics.mean(diffs)
    out["diff_se"] = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return out


RUNS = {"train": run_train, "infer": run_infer, "peak": run_peak, "accuracy": run_accuracy}


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    result = RUNS[spec["kind"]](spec)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
