"""Load a trained model (MLflow registry URI or checkpoint folder) and use it: evaluate on
shards, predict image files. Backs ``asnn-dist evaluate`` and ``asnn-dist predict``.

Device: ``--device`` (default: CUDA when torch sees a GPU, else the CPU); the model's weights
are fp32 (consolidated at the end of training), inputs go to the device with non-blocking
copies (pinned on CUDA) and results come back once per batch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from asnn_dist.errors import UserError
from asnn_dist.models.build import attach_metadata, input_spec, model_from_checkpoint


@dataclass
class LoadedModel:
    model: nn.Module
    source: str
    in_channels: int
    image_size: int
    class_names: list[str] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def resolve_device(name: Optional[str] = None) -> torch.device:
    """``name`` (cpu, cuda, cuda:N) as a device; None or "auto": CUDA when present, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    return device


def load_model(source: str, tracking_uri: Optional[str] = None, device: Optional[str] = None) -> LoadedModel:
    """``models:/NAME@ALIAS``, ``runs:/...`` or a checkpoint folder holding model.pt, on
    ``device`` (``resolve_device``)."""
    target = resolve_device(device)
    if source.startswith(("models:/", "runs:/")):
        from asnn_dist.tracking.model_registry import load_registered_model

        try:
            model = load_registered_model(source, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types; one clear line
            raise UserError(f"cannot load {source} from MLflow ({' '.join(str(exc).split())[:300]}); "
                            "check --tracking-uri / MLFLOW_TRACKING_URI and the model name or alias") from None
    else:
        model = _load_checkpoint_folder(source)
    channels, side = input_spec(model)
    return LoadedModel(model.to(target).eval(), source, channels, side, list(getattr(model, "class_names", [])),
                       target)


def _load_checkpoint_folder(folder: str) -> nn.Module:
    from asnn_dist.train.checkpointing import MODEL_FILE, load_final_model

    if not Path(folder, MODEL_FILE).is_file():
        raise UserError(f"{folder}: no {MODEL_FILE}; pass the final checkpoint folder of a run "
                        "(<storage>/<run>/checkpoint_*/) or a models:/NAME@ALIAS URI")
    state_dict, meta = load_final_model(folder)
    model = model_from_checkpoint(state_dict, meta)
    kw = meta["kwargs"]
    return attach_metadata(model, kw.get("in_channels", 3), kw.get("image_size", 32), meta.get("classes", []))


def evaluate_shards(loaded: LoadedModel, data: str, split: str = "test", batch_size: int = 64,
                    spike_stats: bool = True) -> dict[str, float]:
    """Single-process evaluation over a split's shards (every sample once)."""
    from asnn_dist.data.loader import ShardLoader
    from asnn_dist.data.manifest import load_manifest
    from asnn_dist.train.metrics import evaluate_with_stats

    url = data if data.endswith(".json") else f"{data.rstrip('/')}/{split}.manifest.json"
    loader = ShardLoader(load_manifest(url), batch_size=batch_size, train=False, image_size=loaded.image_size,
                         pin_memory=loaded.device.type == "cuda")
    return evaluate_with_stats(loaded.model, loader, loaded.model.num_steps, spike_stats, device=loaded.device)


@torch.no_grad()
def predict_files(loaded: LoadedModel, paths: list[str], top: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image file."""
    from asnn_dist.data.transforms import decode_image, resize_square

    images = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read image {p}: {exc.strerror}") from None
        img = decode_image(data, loaded.in_channels, where=p).float() / 255.0
        images.append(resize_square(img, loaded.image_size))
    batch = torch.stack(images).to(loaded.device, non_blocking=True)
    probs = torch.softmax(loaded.model(batch).float(), dim=-1).cpu()
    k = min(top, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    names = loaded.class_names or [str(i) for i in range(probs.shape[-1])]
    return [[(names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]
