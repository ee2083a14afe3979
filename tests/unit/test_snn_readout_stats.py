"""Per-step readout, spike statistics (rates, SOPs, energy) and FLOP counting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asnn_dist.snn.neurons import AdaptiveLIF
from asnn_dist.snn.readout import PerStepReadout
from asnn_dist.snn.stats import (
    E_AC_PJ,
    E_MAC_PJ,
    collect_spike_stats,
    count_flops,
    infer_successors,
    synaptic_macs,
)

T = 4


def test_readout_scales_each_step_then_averages() -> None:
    r = PerStepReadout(T)
    assert isinstance(r.scale, nn.Parameter) and r.scale.tolist() == [1.0] * T
    y = torch.randn(T, 2, 3)
    torch.testing.assert_close(r(y), y.mean(0))
    with torch.no_grad():
        r.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    want = (y[0] + 2 * y[1] + 3 * y[2] + 4 * y[3]) / 4
    torch.testing.assert_close(r(y), want)
    any_t = r.anytime(y)
    assert any_t.shape == (T, 2, 3)
    torch.testing.assert_close(any_t[0], y[0])
    torch.testing.assert_close(any_t[1], (y[0] + 2 * y[1]) / 2)
    torch.testing.assert_close(any_t[-1], r(y))
    (r(y).sum()).backward()
    torch.testing.assert_close(r.scale.grad, y.sum(dim=(1, 2)) / T)


def test_readout_fixed_scale_and_validation() -> None:
    r = PerStepReadout(T, learnable=False)
    assert list(r.parameters()) == [] and "scale" in dict(r.named_buffers())
    with pytest.raises(ValueError, match="T=4"):
        r(torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="num_steps"):
        PerStepReadout(0)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), AdaptiveLIF(T), nn.Linear(16, 4), AdaptiveLIF(T)
    )


def test_collect_spike_stats_rates_sops_energy() -> None:
    net = _net()
    xs = [torch.randn(T, 3, 8) * 3, torch.randn(T, 5, 8) * 3]
    spikes_l1, spikes_l3 = [], []
    with collect_spike_stats(net) as stats, torch.no_grad():
        assert net[1].record and net[3].record
        for x in xs:
            h = net[0](x)  # rerun by hand to know the true spikes of each layer
            s1 = net[1](h)
            s3 = net[3](net[2](s1))
            spikes_l1.append(s1)
            spikes_l3.append(s3)
            net(x)
    assert not net[1].record and not net[3].record  # restored
    # each batch went through the net twice (by hand and as a whole): same totals twice
    rate1 = torch.cat(spikes_l1, 1).mean(dim=(1, 2)).double()
    rate3 = torch.cat(spikes_l3, 1).mean(dim=(1, 2)).double()
    rates = stats.firing_rates()
    assert set(rates) == {"1", "3"}
    torch.testing.assert_close(rates["1"], rate1)
    torch.testing.assert_close(rates["3"], rate3)
    assert 0 < rate1.mean() < 1
    assert stats.num_samples == 2 * (3 + 5)
    # layer "1" feeds Linear(16, 4): 4 synapses per spike; layer "3" feeds nothing
    assert stats.fan_out("1") == 4.0 and stats.missing_fan_out == ["3"]
    total1 = 2 * float(torch.cat(spikes_l1, 1).sum())
    sops = stats.synaptic_ops()
    assert sops == {"1": pytest.approx(total1 * 4 / 16)}
    stats.set_fan_out("3", 10.0)
    total3 = 2 * float(torch.cat(spikes_l3, 1).sum())
    assert stats.synaptic_ops()["3"] == pytest.approx(total3 * 10 / 16)
    # analog input layer: the first linear in each forward, T * 8 * 16 MACs per sample
    assert stats.analog_layers == {"0"}
    assert stats.analog_macs() == {"0": pytest.approx(T * 8 * 16)}
    e = stats.energy()
    assert e["mac_pj"] == pytest.approx(E_MAC_PJ * T * 8 * 16)
    assert e["ac_pj"] == pytest.approx(E_AC_PJ * sum(stats.synaptic_ops().values()))
    assert e["total_pj"] == pytest.approx(e["mac_pj"] + e["ac_pj"])
    summary = stats.summary()
    assert summary["firing_rate/1"] == pytest.approx(float(rate1.mean()))
    # hooks are gone: further forwards change nothing
    before = stats.spikes["1"].clone()
    net(xs[0])
    assert torch.equal(stats.spikes["1"], before)


def test_fan_out_inference_in_nested_sequential_and_conv_macs() -> None:
    block = lambda c_in, c_out: nn.Sequential(  # noqa: E731
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), AdaptiveLIF(T)
    )
    net = nn.Sequential(
        block(3, 8), nn.Sequential(nn.MaxPool2d(2), block(8, 16)), nn.Flatten(), nn.Linear(16, 2)
    )
    assert infer_successors(net) == {"0.2": "1.1.0", "1.1.2": "3"}
    conv = nn.Conv2d(3, 8, 3, padding=1)
    out = conv(torch.zeros(2, 3, 8, 8))
    assert synaptic_macs(conv, out) == 2 * 8 * 8 * 8 * 3 * 9
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    assert synaptic_macs(grouped, grouped(torch.zeros(1, 8, 4, 4))) == 8 * 4 * 4 * 2 * 9


def test_count_flops_includes_time_and_restores_mode() -> None:
    net = _net()
    net.train()
    flops = count_flops(net, torch.randn(T, 3, 8))
    assert flops == 2 * (T * 3 * 8 * 16 + T * 3 * 16 * 4)
    assert net.training and net[1].training


def test_stats_cost_nothing_when_off() -> None:
    net = _net()
    net(torch.randn(T, 2, 8))
    assert net[1].last_spike_counts is None
    assert not net[1]._forward_hooks and not net._forward_pre_hooks
