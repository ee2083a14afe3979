"""Every registered model: forward/backward on a tiny input, every parameter gets a non-zero
finite gradient, state does not leak between forwards, eval mode is deterministic.

ImageNet-sized models run on small images (their full sizes are covered by the parameter
count test in test_models_params.py)."""

import pytest
import torch

from asnn_dist.models.common import HybridStem
from asnn_dist.models.execution import apply_time_checkpointing
from asnn_dist.models.step_norm import StepBatchNorm
from asnn_dist.registry import MODELS, create_model, list_models

IMAGENET_STEMS = ("spikformer_8", "spiking_resnet18", "spiking_resnet34", "sew_resnet18", "sew_resnet34")


def small_kwargs(name: str) -> dict:
    """Smallest input each family handles well: ImageNet stems downsample 16x (Spikformer)
    or 32x (ResNet), so they get 32x32 images, everything else 16x16 with one channel."""
    imagenet = name.startswith(IMAGENET_STEMS) and not name.endswith("_cifar")
    kwargs = dict(num_classes=5, in_channels=1, image_size=32 if imagenet else 16)
    if name.startswith("spikformer"):
        # With a handful of tokens the attention neuron (Q K^T V * 0.125, threshold 0.5)
        # rarely fires at the default input gain 0.5, which leaves the projection after it
        # without gradient at initialisation; a gain of 1 makes every path carry gradient.
        kwargs["neuron"] = dict(init_gain=1.0)
    return kwargs


def tiny_batch(name: str, batch: int) -> torch.Tensor:
    kw = small_kwargs(name)
    return torch.rand(batch, kw["in_channels"], kw["image_size"], kw["image_size"])


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_all_params_get_grad(name):
    torch.manual_seed(0)
    model = create_model(name, **small_kwargs(name))
    model.train()
    x = tiny_batch(name, 4)
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
    x = tiny_batch(name, 3)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # membranes start from rest every forward
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


@pytest.mark.parametrize("name", ["spikformer_tiny", "sew_resnet_tiny", "spiking_resnet_tiny"])
def test_hybrid_stem_in_every_family(name):
    """Direct steps reach only the direct stem, spike steps only the spike stem."""
    model = create_model(name, **small_kwargs(name), encoding=dict(num_steps=4, direct_steps=1))
    stem = next(m for m in model.modules() if isinstance(m, HybridStem))
    seen = {}
    for branch in ("direct", "spike"):
        conv = next(m for m in getattr(stem, branch).modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, a, o, b=branch: seen.update({b: a[0].shape[0]}))
    model(tiny_batch(name, 2))
    assert seen == {"direct": 1 * 2, "spike": 3 * 2}  # steps x batch, folded


def test_adaptive_params_are_per_step():
    model = create_model("lenet_asnn_tiny", in_channels=1, image_size=16, encoding=dict(num_steps=6, direct_steps=2))
    leaks = [m.leak for m in model.modules() if hasattr(m, "leak")]
    assert leaks and all(leak.shape == (6,) for leak in leaks)
    shared = create_model("lenet_asnn_tiny", in_channels=1, image_size=16, neuron=dict(adaptive=False))
    assert all(m.leak.shape == (1,) for m in shared.modules() if hasattr(m, "leak"))
    assert model.readout.scale.shape == (6,)


def test_spikformer_attention_neuron_threshold_and_every_layer_adaptive():
    model = create_model("spikformer_tiny", in_channels=1, image_size=16)
    attn = model.blocks[0].attn
    assert attn.attn_lif.threshold == 0.5 and attn.q_lif.threshold == 1.0
    neurons = [m for m in model.modules() if hasattr(m, "leak")]
    assert len(neurons) == 5 + 7  # SPS 4 + rpe, block: q k v attn proj fc1 fc2
    assert all(n.leak.shape == (model.num_steps,) for n in neurons)


def test_step_batchnorm_takes_statistics_per_step():
    """Each step is normalised with its own batch statistics; running stats kept per step."""
    torch.manual_seed(0)
    bn = StepBatchNorm(3, num_steps=2)
    x = torch.randn(2, 8, 3, 4, 4)
    x[1] = 5 * x[1] + 7
    y = bn(x)
    ref = torch.stack([torch.nn.functional.batch_norm(x[t], None, None, training=True) for t in range(2)])
    assert torch.allclose(y, ref, atol=1e-5)
    assert bn.running_mean.shape == (2, 3)
    assert (bn.running_mean[1] > bn.running_mean[0] + 0.5).all()
    bn.eval()
    expect = (x[1] - bn.running_mean[1].view(3, 1, 1)) / (bn.running_var[1].view(3, 1, 1) + 1e-5).sqrt()
    assert torch.allclose(bn(x)[1], expect, atol=1e-5)


def test_unknown_model_error_lists_choices():
    with pytest.raises(KeyError, match=r"unknown model 'lenet'.*did you mean 'lenet_asnn'"):
        create_model("lenet")
    assert "lenet_asnn_tiny" in MODELS.names("*tiny*")
    assert set(MODELS.names(tag="tiny")) == {
        "lenet_asnn_tiny", "spikformer_tiny", "sew_resnet_tiny", "spiking_resnet_tiny"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=18), "multiple of 4"),
    (dict(pools=(True,)), "4 flags"),
])
def test_bad_spikformer_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("spikformer_tiny", **kwargs)


@pytest.mark.parametrize("name", sorted(MODELS.names(tag="tiny")))
@pytest.mark.parametrize("segment", [0, 2])
def test_bf16_autocast_trains_plain_and_checkpointed(name, segment):
    """bf16 autocast: matmuls and convs in bf16, membranes and the classifier head in fp32,
    every parameter gets a finite gradient of its own dtype."""
    torch.manual_seed(0)
    model = apply_time_checkpointing(create_model(name, **small_kwargs(name)), segment)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tiny_batch(name, 4))
    assert logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits.float(), torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", sorted(MODELS.names(tag="tiny")))
def test_models_pickle_and_reload_state(name):
    """MLflow logs models by pickling; checkpoints restore state dicts (per-step BN included)."""
    import pickle

    torch.manual_seed(0)
    model = create_model(name, **small_kwargs(name))
    x = tiny_batch(name, 2)
    model(x)  # move the running statistics
    model.eval()
    clone = pickle.loads(pickle.dumps(model))
    fresh = create_model(name, **small_kwargs(name))
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(clone(x), model(x)) and torch.equal(fresh(x), model(x))
