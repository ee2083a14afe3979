"""Device-correct workers, checked on CPU: the DeepSpeed config per device, RNG states in
checkpoints (CUDA key included), no host read per micro batch (losses stay on the device until
the logging cadence), collectives on the process group's device, ``evaluate``/``predict
--device``. Real DeepSpeed engines and a real one-rank gloo group; nothing is mocked."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from asnn_dist.config import load_config
from asnn_dist.train import checkpointing as ckpt
from asnn_dist.train.deepspeed_config import build_deepspeed_config
from asnn_dist.train.metrics import LossMeter

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on machines without CUDA")


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: the op behind ``.item()``, ``float(t)`` and ``int(t)``,
    i.e. every read of a tensor value by the host (a device sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# ---- DeepSpeed config ------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gpu_runs_get_large_buckets_and_overlapped_reduction(stage):
    gpu = build_deepspeed_config(load_config(None, [f"engine.zero_stage={stage}", "run.use_gpu=true",
                                                    "engine.offload_optimizer=true"]), 4)["zero_optimization"]
    cpu = build_deepspeed_config(load_config(None, [f"engine.zero_stage={stage}", "engine.offload_optimizer=true"]),
                                 4)["zero_optimization"]
    assert gpu["overlap_comm"] is True and cpu["overlap_comm"] is False
    assert gpu["reduce_bucket_size"] >= 2e8 and cpu["reduce_bucket_size"] == 5e7  # CPU as before
    assert gpu["offload_optimizer"]["pin_memory"] is True and cpu["offload_optimizer"]["pin_memory"] is False
    if stage == 3:
        assert gpu["stage3_param_persistence_threshold"] == 1e5 and cpu["stage3_param_persistence_threshold"] == 1e4


def test_stage0_has_no_bucket_settings_on_either_device():
    for extra in ([], ["run.use_gpu=true"]):
        zero = build_deepspeed_config(load_config(None, ["engine.zero_stage=0", *extra]), 2)["zero_optimization"]
        assert zero == {"stage": 0}


# ---- RNG state in checkpoints ----------------------------------------------------------------
def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_is_exact():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _draws()
    state = ckpt.rng_state()
    first = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(state)
    assert _draws() == first
    assert ("cuda" in state) == torch.cuda.is_available()


def test_rng_state_without_a_cuda_key_restores_the_cpu_generators():
    """Checkpoints written on CPU machines (or before CUDA states were saved) have no key."""
    state = {k: v for k, v in ckpt.rng_state().items() if k != "cuda"}
    first = _draws()
    ckpt.set_rng_state(state)
    assert _draws() == first


@no_cuda
def test_a_cuda_rng_state_is_skipped_on_a_machine_without_cuda():
    state = ckpt.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as saved by a GPU worker
    first = _draws()
    ckpt.set_rng_state(state)  # no error: the CPU generators are what a CPU run uses
    assert _draws() == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_state_round_trip():
    torch.cuda.manual_seed_all(3)
    state = ckpt.rng_state()
    first = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed_all(5)
    ckpt.set_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == first


# ---- no host reads per micro batch -------------------------------------------------------------
def test_loss_meter_reads_the_device_once_per_take():
    meter, losses = LossMeter(), [torch.tensor(v) for v in (1.0, 2.0, 4.5)]
    with HostReads() as reads:
        for loss in losses:
            meter.add(loss)
    assert reads.count == 0  # accumulating never reads a value
    with HostReads() as reads:
        assert meter.take() == pytest.approx(2.5)
    assert reads.count == 1
    assert meter.take() == 0.0 and meter.count == 0  # started over


def test_a_float_accumulator_would_be_counted():
    """The counter sees the read ``float(loss)`` did per micro batch before (the test can fail)."""
    with HostReads() as reads:
        total = sum(float(torch.tensor(v)) for v in (1.0, 2.0))
    assert total == 3.0 and reads.count == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_micro_batch_returns_the_loss_on_the_device_without_host_reads(one_rank, precision):
    """The worker's micro batch (real engine): forward, fp32 loss, backward and the loss meter
    read nothing; only the engine's optimizer step may (DeepSpeed's own checks, per step)."""
    from asnn_dist.models.build import model_from_config
    from asnn_dist.train.deepspeed_config import build_engine
    from asnn_dist.train.worker import LoopState, Trainer, masked_loss

    cfg = load_config(None, ["model.name=lenet_asnn_tiny", "optim.micro_batch_size=8", "run.num_workers=1",
                             f"engine.precision={precision}"])
    torch.manual_seed(0)
    engine, optimizer = build_engine(cfg, model_from_config(cfg), 1)
    gen = torch.Generator().manual_seed(0)
    batch = [torch.rand(8, 1, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen),
             torch.ones(8, dtype=torch.bool)]
    meter = LossMeter()
    with HostReads() as reads:
        loss = masked_loss(engine(batch[0]), batch[1], batch[2], 0.1)
        engine.backward(loss)
        meter.add(loss)
    assert reads.count == 0 and loss.dtype == torch.float32
    engine.step()
    # the Trainer's own method, on a real engine (its Ray-side __init__ skipped)
    trainer = object.__new__(Trainer)
    trainer.cfg, trainer.engine, trainer.optimizer, trainer.device = cfg, engine, optimizer, torch.device("cpu")
    trainer.state, trainer.total_steps, trainer.rank = LoopState(), 10, 0
    out = trainer.train_micro_batch(batch)
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and not out.requires_grad
    meter.add(out)
    assert meter.take() == pytest.approx((float(loss.detach()) + float(out)) / 2)
    engine.destroy()


# ---- collectives on the process group's device ---------------------------------------------------
def test_collectives_run_on_the_groups_device(one_rank):
    from asnn_dist.train.evaluate import all_reduce_sums, collective_device
    from asnn_dist.train.metrics import average_buffers, mean_across_ranks

    assert collective_device() == torch.device("cpu")  # gloo
    assert mean_across_ranks({"a": 1.5, "b": -2.0}) == {"a": 1.5, "b": -2.0}
    sums = torch.arange(6, dtype=torch.float64)
    reduced = all_reduce_sums(sums)
    assert reduced.device.type == "cpu" and torch.equal(reduced, sums) and reduced is not sums
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(0.25)
    average_buffers(bn)  # one rank: nothing to average, and no error
    assert torch.equal(bn.running_mean, torch.full((3,), 0.25))


# ---- evaluate / predict --device ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    """A final-checkpoint folder (model.pt + model_meta.json) of an untrained tiny LeNet."""
    from asnn_dist.registry import create_model

    folder = tmp_path_factory.mktemp("final")
    kwargs = dict(num_classes=10, in_channels=1, image_size=16)
    torch.manual_seed(0)
    model = create_model("lenet_asnn_tiny", **kwargs)
    ckpt.save_final_model(str(folder), model.state_dict(), {"model": "lenet_asnn_tiny", "kwargs": kwargs,
                                                            "classes": [str(i) for i in range(10)]})
    return str(folder)


def test_evaluate_and_predict_on_the_cpu_device(model_folder, tmp_path, capsys):
    from PIL import Image

    from asnn_dist.cli import main
    from asnn_dist.data.sources import build_digits_shards

    shards = tmp_path / "digits"
    build_digits_shards(str(shards), samples_per_shard=256, seed=0, progress=False)
    assert main(["evaluate", "--model", model_folder, "--data", str(shards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "(360 samples)" in out
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(image)
    assert main(["predict", "--model", model_folder, str(image), "--device", "cpu", "--top", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


def test_device_default_and_errors(model_folder, capsys):
    from asnn_dist.cli import main
    from asnn_dist.inference import load_model, resolve_device

    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(model_folder, device="cpu")
    assert loaded.device == torch.device("cpu") and next(loaded.model.parameters()).device.type == "cpu"
    assert main(["evaluate", "--model", model_folder, "--data", "x", "--device", "tpu9"]) == 2
    assert "--device 'tpu9'" in capsys.readouterr().err


@no_cuda
def test_cuda_device_without_cuda_is_one_clear_error(model_folder, capsys):
    from asnn_dist.cli import main

    assert main(["predict", "--model", model_folder, "x.png", "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
