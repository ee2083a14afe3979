"""The whole stack once: digits shards -> Ray Train (2 workers) running DeepSpeed ZeRO-2 with
checkpoints on an S3-compatible server -> MLflow tracking server (PostgreSQL backend store,
S3 artifact store) -> registry -> evaluate / predict / load back by models:/NAME@champion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asnn_dist.config import load_config

pytestmark = pytest.mark.integration
DEMO_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "digits-lenet-hybrid.yaml")


def tiny_overrides(tmp_path, shards: str, uri: str, name: str) -> list[str]:
    return [
        f"workdir={tmp_path}", f"data.root={shards}", "data.source=shards", f"tracking.uri={uri}",
        "model.name=lenet_asnn_tiny", "optim.epochs=3", "optim.micro_batch_size=32", "optim.lr=0.01",
        f"name={name}", f"tracking.registered_model={name}", "run.progress=false",
    ]


def test_train_register_and_load_back(tmp_path, digits_shards, ray_local, mlflow_http, s3_endpoint, capsys):
    import boto3
    import mlflow
    from mlflow.tracking import MlflowClient

    from asnn_dist.cli import main
    from asnn_dist.data.loader import ShardLoader
    from asnn_dist.data.manifest import load_manifest
    from asnn_dist.tracking.model_registry import load_registered_model
    from asnn_dist.train.checkpointing import load_final_model
    from asnn_dist.train.evaluate import evaluate
    from asnn_dist.train.launcher import run_training

    cfg = load_config(None, tiny_overrides(tmp_path, digits_shards, mlflow_http, "e2e-tiny") + [
        "run.storage_path=s3://asnn-ckpt/runs", f"s3.endpoint_url={s3_endpoint}", "run.name=e2e-s3"])
    out = run_training(cfg)

    # Evaluation covered every test sample exactly once across the 2 ranks.
    assert out.metrics["val_count"] == 360
    assert out.metrics["epoch"] == 3
    assert out.metrics["val_top1"] > 0.3  # 3 short epochs of a 4-8-8 channel net: well above chance (0.1)
    assert out.registered_version == "1" and out.alias_moved

    # Checkpoints went to the S3-compatible server.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="asnn-ckpt", Prefix="runs/e2e-s3/").get("Contents", [])]
    assert any(k.endswith("/model.pt") for k in keys)
    assert any("/ds/" in k and "optim_states" in k for k in keys)

    client = MlflowClient(tracking_uri=mlflow_http)
    run = client.get_run(out.mlflow_run_id)
    assert run.data.params["engine.zero_stage"] == "2"
    assert run.data.params["encoding.direct_steps"] == "1"
    for key in ("val_top1", "train_loss", "val_anytime_top1_t4", "val_firing_rate/mean", "val_energy/total_pj",
                "leak/body.0/mean", "readout_scale/t1"):
        assert key in run.data.metrics, key
    assert run.info.artifact_uri.startswith("mlflow-artifacts:") or run.info.artifact_uri.startswith("s3://")
    artifacts = {a.path for a in client.list_artifacts(out.mlflow_run_id)}
    assert "config.yaml" in artifacts
    plots = {a.path for a in client.list_artifacts(out.mlflow_run_id, "plots")}
    assert {"plots/neuron_leak_gain.png", "plots/training_curves.png", "plots/firing_rates.png"} <= plots
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket="asnn-mlflow").get("Contents", [])]
    assert any(k.endswith("neuron_leak_gain.png") for k in stored), "plots must land in the S3 artifact store"

    model = load_registered_model("models:/e2e-tiny@champion", tracking_uri=mlflow_http)
    loader = ShardLoader(load_manifest(f"{digits_shards}/test.manifest.json"), batch_size=60,
                         train=False, image_size=16)
    metrics = evaluate(model, loader, model.num_steps, distributed=False)
    assert metrics["val_count"] == 360
    # BatchNorm statistics are averaged over ranks before evaluation and saving, so the
    # registered model is the function the ranks evaluated.
    assert metrics["val_top1"] == pytest.approx(out.metrics["val_top1"], abs=1e-9)

    # The registered weights are exactly the consolidated weights of the final checkpoint.
    with out_checkpoint(out, cfg) as folder:
        state_dict, meta = load_final_model(folder)
    assert meta["model"] == "lenet_asnn_tiny" and meta["classes"] == [str(i) for i in range(10)]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key

    # The pyfunc flavour (what serving uses) agrees with the torch module.
    x = torch.rand(3, 1, 16, 16)
    pyfunc = mlflow.pyfunc.load_model("models:/e2e-tiny@champion")
    assert torch.allclose(torch.as_tensor(pyfunc.predict(x.numpy())), model(x), atol=1e-5)

    # The CLI: evaluate from the registry, predict image files.
    capsys.readouterr()
    assert main(["evaluate", "--model", "models:/e2e-tiny@champion", "--data", digits_shards,
                 "--tracking-uri", mlflow_http]) == 0
    text = capsys.readouterr().out
    assert "(360 samples)" in text and "anytime top-1 by steps used: t1=" in text and "uJ/sample" in text
    images = write_test_pngs(tmp_path, digits_shards, 2)
    assert main(["predict", "--model", "models:/e2e-tiny@champion", "--tracking-uri", mlflow_http,
                 "--top", "3", *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.count(",") == 2 for line in lines)


def out_checkpoint(out, cfg):
    from ray.train import Checkpoint

    from asnn_dist.train.storage import ray_storage

    path, fs = ray_storage("s3://asnn-ckpt/runs", cfg.s3.endpoint_url)
    assert out.checkpoint_path.startswith(path.split("/")[0])
    return Checkpoint(out.checkpoint_path, filesystem=fs).as_directory()


def write_test_pngs(tmp_path, shards: str, count: int) -> list[str]:
    """Real digits images as PNG files (what a user would pass to predict)."""
    import tarfile

    from asnn_dist.data.manifest import load_manifest

    manifest = load_manifest(f"{shards}/test.manifest.json")
    paths = []
    with tarfile.open(manifest.shard_urls()[0]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".png") and len(paths) < count:
                p = tmp_path / f"digit{len(paths)}.png"
                p.write_bytes(tar.extractfile(member).read())
                paths.append(str(p))
    return paths


def test_unreachable_s3_storage_fails_before_training(tmp_path, digits_shards, capsys):
    from asnn_dist.cli import main
    from asnn_dist.testing.services import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    code = main(["train", DEMO_CONFIG, "--set", f"workdir={tmp_path}",
                 f"data.root={digits_shards}", "data.source=shards", "run.storage_path=s3://asnn-ckpt/x",
                 f"s3.endpoint_url={endpoint}"])
    err = capsys.readouterr().err
    assert code == 3
    assert f"cannot reach S3 storage s3://asnn-ckpt/x (endpoint {endpoint})" in err
