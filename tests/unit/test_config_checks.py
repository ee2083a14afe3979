"""Config checks that check: model.options against the factory's keywords, data.in_channels in
one place, and data.num_classes / data.in_channels against the manifests at start-up."""

from __future__ import annotations

import pytest

from asnn_dist.config import load_config
from asnn_dist.config.schema import MODEL_KEYS_FROM_CONFIG
from asnn_dist.errors import ConfigError
from asnn_dist.registry import MODELS, list_models


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


def test_unknown_option_names_field_key_and_allowed_keys() -> None:
    msg = _error(["model.options.widthz=[4, 8, 8]"])
    assert msg.startswith("invalid config: model.options.widthz: unknown key of model 'lenet_asnn'")
    assert "did you mean 'model.options.widths'?" in msg
    assert msg.endswith("(allowed keys: hidden, widths)")


def test_option_set_by_another_field_is_refused() -> None:
    msg = _error(["model.options.num_classes=3"])
    assert "model.options.num_classes: set by data.num_classes" in msg
    msg = _error(["model.options.pack_spikes=false"])  # how the model runs: not a model keyword
    assert "model.options.pack_spikes: set by checkpoint.pack_spikes" in msg


def test_options_follow_the_model_name() -> None:
    cfg = load_config(None, ["model.name=spikformer_tiny", "model.options={dim: 64, depth: 2}"])
    assert cfg.model.options == {"dim": 64, "depth": 2}
    assert "allowed keys: depth, dim, heads, mlp_ratio, pools" in _error(
        ["model.name=spikformer_tiny", "model.options.widths=[4, 8]"])


def test_every_registered_model_has_checkable_keywords() -> None:
    """A factory whose keywords cannot be found would let any key through silently."""
    for name in list_models():
        keywords = MODELS.keywords(name)
        assert keywords is not None, name
        assert set(MODEL_KEYS_FROM_CONFIG) <= set(keywords), name


def test_keys_from_config_are_what_build_fills() -> None:
    from asnn_dist.models.build import model_kwargs

    assert set(model_kwargs(load_config(None))) == set(MODEL_KEYS_FROM_CONFIG)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_in_channels_allows_what_the_decoder_makes(channels: int) -> None:
    assert "data.in_channels: bad value" in _error([f"data.in_channels={channels}"])


def test_in_channels_three_is_valid() -> None:
    assert load_config(None, ["data.in_channels=3"]).data.in_channels == 3


def test_num_classes_differing_from_manifest_fails_before_training(digits_shards: str) -> None:
    from asnn_dist.train.launcher import prepare_data

    cfg = load_config(None, ["data.source=shards", f"data.root={digits_shards}", "data.num_classes=5"])
    with pytest.raises(ConfigError) as info:
        prepare_data(cfg)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("data.num_classes=5 but the manifest ") and "lists 10 classes" in msg
    assert "set data.num_classes=10" in msg
    prepare_data(load_config(None, ["data.source=shards", f"data.root={digits_shards}"]))  # matching: passes


def test_in_channels_differing_from_manifest_fails_before_training(tmp_path) -> None:
    from asnn_dist.data.builders import build_synthetic_shards
    from asnn_dist.train.launcher import prepare_data

    for split in ("train", "test"):
        build_synthetic_shards(str(tmp_path), 4, num_classes=2, width=16, height=16, split=split,
                               samples_per_shard=4, progress=False)
    base = ["data.source=shards", f"data.root={tmp_path}", "data.num_classes=2"]
    with pytest.raises(ConfigError, match=r"data.in_channels=1 but the manifest .* stores 3-channel \(RGB\) "
                                          r"images; set data.in_channels=3"):
        prepare_data(load_config(None, base))
    prepare_data(load_config(None, [*base, "data.in_channels=3"]))
