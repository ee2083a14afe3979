"""Plots render real PNGs from a model's learned parameters and from evaluation metrics."""

from PIL import Image

from asnn_dist.registry import create_model
from asnn_dist.tracking.plots import (firing_rates_from_metrics, learned_neuron_params, plot_firing_rates,
                                      plot_neuron_heatmaps)


def test_neuron_heatmap_png(tmp_path):
    model = create_model("lenet_asnn_tiny", in_channels=1, image_size=16, encoding=dict(num_steps=5, direct_steps=1))
    params = learned_neuron_params(model)
    assert len(params) == 4 and all(len(p["leak"]) == 5 for p in params.values())
    out = plot_neuron_heatmaps(model, str(tmp_path / "leak.png"))
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_firing_rate_heatmap_png(tmp_path):
    metrics = {"val_firing_rate_step/body.0/t1": 0.1, "val_firing_rate_step/body.0/t2": 0.3,
               "val_firing_rate_step/body.3/t2": 0.2, "val_firing_rate_step/body.3/t1": 0.05, "val_top1": 0.9}
    assert firing_rates_from_metrics(metrics) == {"body.0": [0.1, 0.3], "body.3": [0.05, 0.2]}
    with Image.open(plot_firing_rates(metrics, str(tmp_path / "fr.png"))) as img:
        assert img.format == "PNG"
    assert plot_firing_rates({"val_top1": 1.0}, str(tmp_path / "none.png")) is None
