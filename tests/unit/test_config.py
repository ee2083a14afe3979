"""Config loading: extends chains, overrides, and one-line errors naming field/value/allowed."""

from pathlib import Path

import pytest

from asnn_dist.config import ExperimentConfig, dump_config, flatten_config, load_config
from asnn_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo" / "digits-lenet-hybrid.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_demo_yaml_matches_embedded_defaults():
    from_file = load_config(DEMO).model_dump()
    defaults = load_config(None).model_dump()
    for d in (from_file, defaults):
        d.pop("name")
        d["tracking"].pop("experiment")
    assert from_file == defaults


def test_extends_and_overrides(tmp_path):
    base = write(tmp_path, "base.yaml", "optim:\n  lr: 0.01\n  epochs: 3\nencoding:\n  num_steps: 6\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\noptim:\n  epochs: 5\n")
    cfg = load_config(child, ["optim.lr=1e-3", "run.num_workers=4", "encoding.scheme=bitplane"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.epochs == 5  # child wins over base
    assert cfg.encoding.num_steps == 6  # inherited
    assert cfg.run.num_workers == 4
    assert cfg.encoding.scheme == "bitplane"
    assert cfg.global_batch_size == 32 * 4


def test_paths_resolved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["workdir=work"])
    assert cfg.workdir == str(tmp_path / "work")
    assert cfg.data.root == str(tmp_path / "work" / "shards" / "digits")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    assert cfg.run.storage_path == str(tmp_path / "work" / "ray_results")


def test_unknown_key_suggests_nearest(tmp_path):
    p = write(tmp_path, "c.yaml", "encoding:\n  schme: threshold\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "encoding.schme: unknown key" in msg
    assert "did you mean 'encoding.scheme'" in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer: unknown key; did you mean 'optim'"):
        load_config(None, ["optimizer.lr=1"])


def test_bad_literal_names_allowed_values():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["engine.zero_stage=5"])
    msg = str(exc.value)
    assert "engine.zero_stage" in msg and "5" in msg and "0, 1, 2 or 3" in msg


def test_time_levels_and_states_reach_the_model_and_are_checked():
    from asnn_dist.models.build import model_from_config, model_kwargs
    from asnn_dist.models.execution import time_checkpointing

    cfg = load_config(None, ["checkpoint.time_segment=1", "checkpoint.time_levels=1"])
    assert time_checkpointing(model_from_config(cfg)).levels == 1 and load_config(None).checkpoint.time_levels == 2
    assert "time_levels" not in model_kwargs(cfg)  # how the model runs, not what it is
    assert time_checkpointing(model_from_config(load_config(None))) is None
    with pytest.raises(ConfigError, match=r"checkpoint.time_levels: bad value 3.*1 or 2"):
        load_config(None, ["checkpoint.time_levels=3"])
    cfg = load_config(None, ["checkpoint.time_segment=1", "checkpoint.time_states=2"])
    schedule = time_checkpointing(model_from_config(cfg))
    assert (schedule.segment, schedule.states) == (1, 2) and load_config(None).checkpoint.time_states is None
    with pytest.raises(ConfigError, match=r"checkpoint.time_states: bad value -1"):
        load_config(None, ["checkpoint.time_states=-1"])


def test_adaptive_variants_reach_the_model():
    """neuron.adaptive: true (ASNN), false (our shared-pair baseline) and fixed_readout (the
    authors' ASNN=False: per-step leak and gain, readout scale fixed at 1)."""
    from asnn_dist.models.build import model_from_config

    def built(*overrides: str) -> tuple[set, bool]:
        cfg = load_config(None, ["model.name=lenet_asnn_tiny", "encoding.num_steps=3", *overrides])
        model = model_from_config(cfg)
        leaks = {tuple(m.leak.shape) for m in model.modules() if hasattr(m, "leak")}
        return leaks, model.readout.learnable

    assert built() == ({(3,)}, True)
    assert built("neuron.adaptive=false") == ({(1,)}, True)
    assert built("neuron.adaptive=fixed_readout") == ({(3,)}, False)
    cfg = load_config(None, ["neuron.adaptive=fixed_readout"])
    assert cfg.model.learnable_readout is False and ExperimentConfig.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ConfigError, match=r"fixed_readout fixes the readout scale.*learnable_readout=true"):
        load_config(None, ["neuron.adaptive=fixed_readout", "model.learnable_readout=true"])
    with pytest.raises(ConfigError, match=r"neuron.adaptive: bad value 'paper'.*True, False or 'fixed_readout'"):
        load_config(None, ["neuron.adaptive=paper"])


def test_bad_scheme_value():
    with pytest.raises(ConfigError, match=r"encoding.scheme: bad value 'temporal'.*'direct', 'threshold', 'bitplane' or 'rate'"):
        load_config(None, ["encoding.scheme=temporal"])


def test_bad_range_names_bound():
    with pytest.raises(ConfigError, match=r"optim.lr: bad value -0.1.*greater than 0"):
        load_config(None, ["optim.lr=-0.1"])


def test_direct_steps_cannot_exceed_steps():
    with pytest.raises(ConfigError, match=r"direct_steps=5 exceeds num_steps=4; allowed: 0..4"):
        load_config(None, ["encoding.direct_steps=5"])


def test_unknown_model_lists_registered():
    with pytest.raises(ConfigError, match=r"model.name: bad value 'lenet'.*unknown model 'lenet'.*did you mean.*lenet_asnn"):
        load_config(None, ["model.name=lenet"])


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1", "optim.lr.x=1"])
def test_bad_override(bad):
    with pytest.raises(ConfigError, match="override|optim.lr"):
        load_config(None, [bad])


def test_credentials_rejected(tmp_path):
    with pytest.raises(ConfigError, match="aws_secret_access_key: credentials do not belong in configs"):
        load_config(None, ["data.aws_secret_access_key=abc"])
    with pytest.raises(ConfigError, match="credentials in the tracking URI"):
        load_config(None, ["tracking.uri=postgresql://user:pw@db/mlflow"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "bad.yaml", "a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dump_roundtrip_and_flatten(tmp_path):
    cfg = load_config(DEMO, ["optim.lr=0.005"])
    p = write(tmp_path, "resolved.yaml", dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    flat = flatten_config(cfg)
    assert flat["optim.lr"] == "0.005"
    assert flat["encoding.direct_steps"] == "1"
    assert isinstance(ExperimentConfig.model_validate(cfg.model_dump()), ExperimentConfig)


def test_global_batch_checked():
    cfg = load_config(None, ["optim.global_batch_size=128", "optim.grad_accum_steps=2"])
    assert cfg.global_batch_size == 128
    with pytest.raises(ConfigError, match=r"optim.global_batch_size=100 but .* 32 x 1 x 2 = 64"):
        load_config(None, ["optim.global_batch_size=100"])


def test_precision_and_offload_rules():
    with pytest.raises(ConfigError, match="fp16 needs run.use_gpu=true"):
        load_config(None, ["engine.precision=fp16"])
    with pytest.raises(ConfigError, match="offload_params needs engine.zero_stage=3"):
        load_config(None, ["engine.offload_params=true"])
    assert load_config(None, ["engine.precision=bf16"]).engine.precision == "bf16"


def test_deepspeed_config_generated():
    from asnn_dist.train.deepspeed_config import build_deepspeed_config, build_optimizer

    cfg = load_config(None, ["engine.zero_stage=3", "optim.grad_accum_steps=4", "optim.grad_clip=1.0",
                             "engine.offload_optimizer=true", "engine.precision=bf16"])
    ds = build_deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 32 * 4 * 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True} and "optimizer" not in ds
    import torch

    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW)
    lamb = load_config(None, ["optim.name=lamb"])
    assert build_deepspeed_config(lamb, 2)["optimizer"]["type"] == "Lamb" and build_optimizer(lamb, []) is None


def test_lr_schedule_warmup_then_cosine():
    from asnn_dist.train.schedule import lr_at

    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, warmup=10, min_lr=0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, warmup=10, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(50, 100, 0.3, kind="constant") == 0.3


def test_tracking_uri_defaults_to_mlflow_tracking_uri_env(monkeypatch, tmp_path):
    """A cluster sets MLFLOW_TRACKING_URI on its nodes; a job's config need not repeat it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert load_config(None, [f"workdir={tmp_path}"]).tracking.uri == "http://mlflow.internal:5000"
    assert load_config(None, [f"workdir={tmp_path}", "tracking.uri=sqlite:///x.db"]).tracking.uri == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:pw@mlflow.internal:5000")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: credentials"):
        load_config(None, [f"workdir={tmp_path}"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config(None, [f"workdir={tmp_path}"]).tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_placement_strategy_is_validated():
    assert load_config(None, ["run.placement_strategy=STRICT_SPREAD"]).run.placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ConfigError, match="run.placement_strategy"):
        load_config(None, ["run.placement_strategy=SCATTER"])
