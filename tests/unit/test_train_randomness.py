"""Per-rank, position-derived randomness in training (``train/randomness.py``): the worker's own
``Trainer.train_micro_batch`` on a tiny model with a hybrid rate code, dropout and mixup. Ranks
draw different noise; a run stopped and resumed on fresh modules (fresh generators, nothing but
weights and optimizer state carried over) ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import copy

import torch
from torch import nn

from asnn_dist.config import load_config
from asnn_dist.snn.encoders import build_encoder
from asnn_dist.train.randomness import reseed_model
from asnn_dist.train.worker import LoopState, Trainer


class Noisy(nn.Module):
    """Hybrid rate code (1 direct step + 3 Bernoulli steps), dropout, a linear readout."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = build_encoder("rate", 4, direct_steps=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.encoder(x)  # [T, B, 1, 4, 4]
        return self.fc(self.drop(seq.transpose(0, 1).flatten(1)))


class TinyEngine:
    """The engine calls ``train_micro_batch`` makes, on a plain module and SGD with momentum."""

    def __init__(self, module: nn.Module, optimizer_state: dict | None = None) -> None:
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


CFG = load_config(None, ["data.mixup_alpha=0.4", "optim.micro_batch_size=6", "optim.warmup_steps=0"])


def trainer(rank: int, weights: dict, optimizer_state: dict | None = None, micro: int = 0) -> Trainer:
    model = Noisy()
    model.load_state_dict(weights)
    t = object.__new__(Trainer)  # the Trainer's own micro-batch code, its Ray-side __init__ skipped
    t.cfg, t.rank, t.device, t.total_steps = CFG, rank, torch.device("cpu"), 100
    t.engine = TinyEngine(model, optimizer_state)
    t.optimizer = t.engine.optimizer
    t.state = LoopState(epoch=0, global_step=micro, micro_in_epoch=micro)
    return t


def batch(i: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return [torch.rand(6, 1, 4, 4, generator=gen), torch.randint(0, 10, (6,), generator=gen),
            torch.ones(6, dtype=torch.bool)]


def train(t: Trainer, micros: range) -> None:
    for micro in micros:
        assert t.state.micro_in_epoch == micro
        t.train_micro_batch(batch(micro))
        t.state.micro_in_epoch = t.state.global_step = micro + 1


def test_ranks_draw_different_noise_from_the_same_position() -> None:
    model = Noisy()
    x = torch.rand(2, 1, 4, 4)
    codes = {}
    for rank in (0, 1, 0):
        reseed_model(model, 0, rank, 0, 5)
        codes.setdefault(rank, []).append(model.encoder(x))
    assert torch.equal(codes[0][0], codes[0][1])  # the same (seed, rank, position): the same spikes
    assert not torch.equal(codes[0][0], codes[1][0])
    start = Noisy().state_dict()
    ranks = [trainer(rank, start) for rank in (0, 1)]
    for t in ranks:
        train(t, range(2))
    w0, w1 = (t.engine.module.fc.weight for t in ranks)
    assert not torch.equal(w0, w1)


def test_resume_on_fresh_modules_is_bit_exact() -> None:
    start = Noisy().state_dict()
    whole = trainer(1, start)
    train(whole, range(6))
    first = trainer(1, start)
    train(first, range(3))
    weights, opt = copy.deepcopy(first.engine.module.state_dict()), copy.deepcopy(first.optimizer.state_dict())
    torch.manual_seed(1234)  # whatever the global generators hold after a restart
    resumed = trainer(1, weights, opt, micro=3)
    train(resumed, range(3, 6))
    for key, value in whole.engine.module.state_dict().items():
        assert torch.equal(value, resumed.engine.module.state_dict()[key]), key
