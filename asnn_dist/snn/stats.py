"""Spike statistics: firing rates, synaptic operations, energy estimate, FLOPs.

Zero cost when off: neurons only count spikes while their ``record`` flag is True, and the
hooks below exist only inside ``collect_spike_stats``.

Conventions (documented because papers differ):
- firing rate of a neuron layer at step t = spikes at t / neurons in the layer, over all
  batches seen inside the context.
- fan-out of a neuron layer = MACs of the synaptic layer (conv/linear) that reads its spikes,
  divided by that layer's input size, i.e. the average number of synapses per input value
  (out_features for linear, about C_out * k * k / stride^2 for conv). It is inferred for
  neurons inside an ``nn.Sequential`` followed by a conv/linear before the next neuron
  (nested Sequentials are flattened); anything else is given with ``fan_out={name: value}``
  or ``SpikeStats.set_fan_out``. Layers with no fan-out are listed in ``missing_fan_out``.
- synaptic operations (SOPs) = sum over steps of spikes x fan-out, per sample. With nothing
  between the neuron and its conv/linear this equals firing rate x T x MACs of that layer.
- energy (Spikformer paper, 45 nm): 4.6 pJ per MAC of the analog-input layers plus 0.9 pJ per
  SOP. Analog-input layers default to the first conv/linear run in each forward (the stem);
  pass ``analog_layers`` for other layouts (e.g. hybrid models with a separate direct stem).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
SYNAPTIC_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_neuron(module: nn.Module) -> bool:
    """A spiking layer of this package: it has a boolean ``record`` switch."""
    return isinstance(getattr(module, "record", None), bool) and type(
        module
    ).__module__.startswith("asnn_dist.")


def synaptic_macs(module: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one call of a conv/linear layer, from its output size."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return output.numel() * per_output


def _flatten_sequential(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for child_name, child in seq.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, nn.Sequential):
            out.extend(_flatten_sequential(child, name))
        else:
            out.append((name, child))
    return out


def infer_successors(model: nn.Module) -> dict[str, str]:
    """Neuron layer name -> name of the conv/linear that reads its spikes (Sequential only)."""
    found: dict[str, str] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        flat = _flatten_sequential(module, prefix)
        for i, (name, child) in enumerate(flat):
            if not is_neuron(child) or name in found:
                continue
            for next_name, nxt in flat[i + 1 :]:
                if is_neuron(nxt):
                    break
                if isinstance(nxt, SYNAPTIC_TYPES):
                    found[name] = next_name
                    break
    return found


class SpikeStats:
    """Accumulates what the hooks of ``collect_spike_stats`` see; query after forwards."""

    def __init__(
        self,
        successors: Mapping[str, str],
        fan_out: Mapping[str, float] | None = None,
        analog_layers: Iterable[str] | None = None,
    ) -> None:
        self.successors = dict(successors)
        self._fan_out = dict(fan_out or {})
        self._auto_analog = analog_layers is None
        self.analog_layers: set[str] = set(analog_layers or ())
        self.spikes: dict[str, Tensor] = {}
        self.neurons_per_step: dict[str, int] = {}
        self.samples: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        self.macs_per_input: dict[str, float] = {}
        self.forwards = 0
        self._first_pending = False

    # hooks -------------------------------------------------------------------------------
    def _start_forward(self, module: nn.Module, args: Any) -> None:
        self.forwards += 1
        self._first_pending = True

    def _neuron_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            counts = module.last_spike_counts.to(torch.float64)
            prev = self.spikes.get(name)
            self.spikes[name] = counts if prev is None else prev + counts
            self.neurons_per_step[name] = (
                self.neurons_per_step.get(name, 0) + module.last_numel_per_step
            )
            self.samples[name] = self.samples.get(name, 0) + int(output.shape[1])

        return hook

    def _synapse_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            macs = synaptic_macs(module, output)
            self.macs[name] = self.macs.get(name, 0) + macs
            self.macs_per_input[name] = macs / max(args[0].numel(), 1)
            if self._first_pending and self._auto_analog:
                self.analog_layers.add(name)
            self._first_pending = False

        return hook

    # queries -----------------------------------------------------------------------------
    def set_fan_out(self, name: str, fan_out: float) -> None:
        """Synapses per spike of neuron layer ``name`` (overrides the inferred value)."""
        self._fan_out[name] = float(fan_out)

    def fan_out(self, name: str) -> float | None:
        if name in self._fan_out:
            return self._fan_out[name]
        return self.macs_per_input.get(self.successors.get(name, ""))

    @property
    def num_samples(self) -> int:
        return max(self.samples.values(), default=self.forwards)

    @property
    def missing_fan_out(self) -> list[str]:
        return sorted(n for n in self.spikes if self.fan_out(n) is None)

    def firing_rates(self) -> dict[str, Tensor]:
        """Layer name -> firing rate per step [T] (float64)."""
        return {n: s / (self.neurons_per_step[n] or 1) for n, s in self.spikes.items()}

    def mean_firing_rate(self) -> float:
        """Spikes / (neurons x steps) over all recorded layers."""
        spikes = sum(float(s.sum()) for s in self.spikes.values())
        slots = sum(self.neurons_per_step[n] * s.numel() for n, s in self.spikes.items())
        return spikes / slots if slots else 0.0

    def synaptic_ops(self) -> dict[str, float]:
        """Neuron layer name -> SOPs per sample (layers with a known fan-out)."""
        n = max(self.num_samples, 1)
        out = {}
        for name, s in self.spikes.items():
            f = self.fan_out(name)
            if f is not None:
                out[name] = float(s.sum()) * f / n
        return out

    def analog_macs(self) -> dict[str, float]:
        """Analog-input layer name -> MACs per sample."""
        n = max(self.num_samples, 1)
        return {k: self.macs[k] / n for k in sorted(self.analog_layers) if k in self.macs}

    def energy(self) -> dict[str, float]:
        """Energy per sample in pJ: MAC part, accumulate part and total (and mJ)."""
        mac = E_MAC_PJ * sum(self.analog_macs().values())
        ac = E_AC_PJ * sum(self.synaptic_ops().values())
        return {"mac_pj": mac, "ac_pj": ac, "total_pj": mac + ac, "total_mj": (mac + ac) * 1e-9}

    def summary(self) -> dict[str, float]:
        """Flat scalars for metric loggers."""
        out = {f"firing_rate/{n}": float(r.mean()) for n, r in self.firing_rates().items()}
        out["firing_rate/mean"] = self.mean_firing_rate()
        out["sops_per_sample"] = sum(self.synaptic_ops().values())
        out.update({f"energy/{k}": v for k, v in self.energy().items()})
        return out


@contextmanager
def collect_spike_stats(
    model: nn.Module,
    fan_out: Mapping[str, float] | None = None,
    analog_layers: Iterable[str] | None = None,
) -> Iterator[SpikeStats]:
    """Record spikes of every neuron layer of ``model`` for the duration of the block."""
    stats = SpikeStats(infer_successors(model), fan_out, analog_layers)
    handles = [model.register_forward_pre_hook(stats._start_forward)]
    previous: dict[nn.Module, bool] = {}
    try:
        for name, module in model.named_modules():
            if is_neuron(module):
                previous[module] = module.record
                module.record = True
                handles.append(module.register_forward_hook(stats._neuron_hook(name)))
            elif isinstance(module, SYNAPTIC_TYPES):
                handles.append(module.register_forward_hook(stats._synapse_hook(name)))
        yield stats
    finally:
        for h in handles:
            h.remove()
        for module, flag in previous.items():
            module.record = flag


def count_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs (2 x MACs) of the conv/linear layers in one forward, all time steps included.

    Runs one forward in eval mode under no_grad (training flags are restored afterwards).
    """
    total = 0

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        nonlocal total
        total += 2 * synaptic_macs(module, output)

    modes = {m: m.training for m in model.modules()}
    synaptic = [m for m in model.modules() if isinstance(m, SYNAPTIC_TYPES)]
    handles = [m.register_forward_hook(hook) for m in synaptic]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return total
