"""The measurements of ``bench model`` that run in a fresh process each (one JSON line out).

Why a fresh process per measurement: peak memory is the process high-water mark (VmHWM),
which only a new process reports for one configuration alone; and one configuration's
allocator state or thread pools cannot slow down the next.

Kinds (``spec["kind"]``):
- ``train``: synthetic batch, AdamW, ``warmup`` steps then ``iters`` timed steps (forward,
  cross-entropy, backward, optimizer step); images/s from the fastest step (on a shared
  machine the least disturbed one; every step time is returned too).
- ``infer``: eval mode under ``torch.inference_mode``, same timing rule.
- ``peak``: dense square matmul FLOP/s (fp32 and bf16), the best of several repeats.
- ``accuracy``: short real-data runs (scikit-learn digits with the digits demo's recipe:
  LeNet ASNN, hybrid coding, its optimizer and schedule) trained in fp32 and in bf16
  autocast from the same initialisations; test accuracy of each and their paired difference.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from asnn_dist.registry import create_model


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


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _model(spec: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        spec["model"], image_size=spec["image_size"], num_classes=spec["num_classes"],
        encoding=dict(num_steps=spec["steps"], direct_steps=1, scheme="threshold"),
        time_segment=spec.get("segment", 0), time_levels=spec.get("levels", 2),
        time_states=spec.get("states"),
    )


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


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    model = _model(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = _batch(spec)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(spec["precision"]):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()

    return _result(_time(step, spec["warmup"], spec["iters"]))


def _result(times: list[float]) -> dict[str, Any]:
    return {"step_s": min(times), "median_s": statistics.median(times), "times": times, "peak_mib": peak_rss_mib()}


def run_infer(spec: dict[str, Any]) -> dict[str, Any]:
    model = _model(spec).eval()
    x, _ = _batch(spec)

    def step() -> None:
        with torch.inference_mode(), _autocast(spec["precision"]):
            model(x)

    return _result(_time(step, spec["warmup"], spec["iters"]))


def run_peak(spec: dict[str, Any]) -> dict[str, Any]:
    n, out = spec.get("size", 2048), {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        times = _time(lambda: torch.mm(a, b), 2, spec.get("repeats", 8))
        out[f"{name}_gflops"] = 2 * n**3 / min(times) / 1e9
    return out


def _digits(size: int = 16) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    return x[tr], y[tr], x[te], y[te]


def _digits_accuracy(precision: str, seed: int, epochs: int, data: tuple[torch.Tensor, ...]) -> float:
    """Test accuracy of the digits demo's recipe (``asnn-dist demo``'s built-in config: LeNet
    ASNN, hybrid coding, AdamW with its warmup + cosine schedule, global batch = micro batch x
    workers) trained in one process, in fp32 or under bf16 autocast, from seed ``seed``."""
    from asnn_dist.config import load_config
    from asnn_dist.models.build import model_from_config
    from asnn_dist.train.deepspeed_config import build_optimizer
    from asnn_dist.train.schedule import lr_at

    cfg = load_config(None, [f"seed={seed}", f"optim.epochs={epochs}"])
    o = cfg.optim
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = model_from_config(cfg)
    opt = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    batch = o.micro_batch_size * cfg.run.num_workers
    g = torch.Generator().manual_seed(seed)
    per_epoch = -(-len(ytr) // batch)
    step = 0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(batch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, epochs * per_epoch, o.lr, o.warmup_steps, o.min_lr, o.schedule)
            opt.zero_grad(set_to_none=True)
            with _autocast(precision):
                logits = model(xtr[idx])
            F.cross_entropy(logits.float(), ytr[idx], label_smoothing=o.label_smoothing).backward()
            opt.step()
            step += 1
    model.eval()
    with torch.inference_mode(), _autocast(precision):
        return (model(xte).argmax(1) == yte).float().mean().item()


def run_accuracy(spec: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy per seed of fp32 and bf16 training from the same initialisation (one
    seed's run is noisy on 360 test images, so several are averaged and the per-seed
    differences give the paired comparison)."""
    data = _digits()
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        accs = [_digits_accuracy(precision, seed, spec["epochs"], data) for seed in range(spec["seeds"])]
        out[f"{precision}_accs"] = accs
        out[f"{precision}_acc"] = statistics.mean(accs)
        out[f"{precision}_s"] = time.perf_counter() - t0
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
