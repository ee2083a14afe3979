"""Every registered model: forward/backward on a tiny input, every parameter gets a non-zero
finite gradient, state does not leak between forwards, eval mode is deterministic."""

import pytest
import torch

from asnn_dist.registry import MODELS, create_model, list_models

TINY_INPUT = {"lenet": dict(in_channels=1, image_size=16)}


def small_kwargs(name: str) -> dict:
    family = name.split("_")[0]
    return dict(num_classes=5, **TINY_INPUT[family])


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_all_params_get_grad(name):
    torch.manual_seed(0)
    model = create_model(name, **small_kwargs(name))
    model.train()
    x = torch.rand(4, 1, 16, 16)
    logits = model(x)
    assert logits.shape == (4, 5)
    (logits * torch.randn_like(logits)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list_models())
def test_repeat_forward_identical_and_eval_deterministic(name):
    torch.manual_seed(0)
    model = create_model(name, **small_kwargs(name))
    x = torch.rand(3, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    steps = model.anytime(x)
    assert steps.shape == (model.num_steps, 3, 5)
    assert torch.allclose(steps[-1], a, atol=1e-6)


def test_hybrid_routes_direct_steps_through_own_stem():
    model = create_model("lenet_asnn_tiny", in_channels=1, image_size=16,
                         encoding=dict(num_steps=4, direct_steps=1, scheme="threshold"))
    assert model.stem.direct is not None and model.stem.spike is not None
    direct = create_model("lenet_asnn_tiny", in_channels=1, image_size=16,
                          encoding=dict(num_steps=4, direct_steps=4, scheme="direct"))
    assert direct.stem.spike is None


def test_adaptive_params_are_per_step():
    model = create_model("lenet_asnn_tiny", in_channels=1, image_size=16, encoding=dict(num_steps=6, direct_steps=2))
    leaks = [m.leak for m in model.modules() if hasattr(m, "leak")]
    assert leaks and all(leak.shape == (6,) for leak in leaks)
    shared = create_model("lenet_asnn_tiny", in_channels=1, image_size=16, neuron=dict(adaptive=False))
    assert all(m.leak.shape == (1,) for m in shared.modules() if hasattr(m, "leak"))
    assert model.readout.scale.shape == (6,)


def test_unknown_model_error_lists_choices():
    with pytest.raises(KeyError, match=r"unknown model 'lenet'.*did you mean 'lenet_asnn'"):
        create_model("lenet")
    assert "lenet_asnn_tiny" in MODELS.names("*tiny*")
