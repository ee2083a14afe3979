"""The typed experiment config: one pydantic tree that every part of asnn-dist reads.

Every field carries a one-line description (shown by ``asnn-dist config show --doc``); unknown
keys are errors (``extra="forbid"``) so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from asnn_dist.registry import MODELS


class Section(BaseModel):
    """Base for config sections: strict keys, validated assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: Literal["digits", "shards"] = Field(
        "digits",
        description="'digits' builds shards from scikit-learn's bundled digits when missing; "
        "'shards' reads existing shards under data.root",
    )
    root: Optional[str] = Field(
        None, description="folder (or URL) holding <split>.manifest.json and shards; default <workdir>/shards/<source>"
    )
    train_split: str = Field("train", description="split name of the training manifest")
    val_split: str = Field("test", description="split name of the evaluation manifest")
    image_size: int = Field(16, ge=4, le=1024, description="square side the images are resized to")
    in_channels: Literal[1, 3] = Field(1, description="image channels the model receives: 1 grayscale, 3 RGB (what the decoder makes)")
    num_classes: int = Field(10, ge=2, description="number of classes")
    num_workers: int = Field(0, ge=0, le=64, description="data loader worker processes per rank")
    shuffle_buffer: int = Field(256, ge=0, description="samples held in the per-worker shuffle buffer")
    samples_per_shard: int = Field(64, ge=1, description="samples per shard when shards are built")
    augment: bool = Field(False, description="random augmentation of training images (per recipe)")
    recipe: Literal["digits", "cifar", "imagenet"] = Field(
        "digits", description="transforms: digits (resize, shifts), cifar (pad-4 crop + flip), imagenet "
        "(random resized crop + flip + RandAugment; eval resize 256 + centre crop)"
    )
    mode: Literal["exact", "resampled"] = Field(
        "exact", description="exact epochs (each sample once) or resampled epochs of epoch_length samples"
    )
    epoch_length: Optional[int] = Field(None, ge=1, description="samples per resampled epoch; default split size")
    mixup_alpha: float = Field(0.0, ge=0.0, description="mixup Beta(alpha, alpha) on training batches (0 = off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="cutmix Beta(alpha, alpha) on training batches (0 = off)")


class EncodingConfig(Section):
    num_steps: int = Field(4, ge=1, le=256, description="time steps T")
    direct_steps: int = Field(
        1, ge=0, description="k leading analog steps (hybrid code); k = T means pure direct coding"
    )
    scheme: Literal["direct", "threshold", "bitplane", "rate"] = Field(
        "threshold", description="temporal code used for the T - k spike steps"
    )
    levels: Literal["uniform", "equal_mass"] = Field(
        "uniform", description="threshold rule of the temporal code"
    )
    num_levels: Optional[int] = Field(
        None, ge=1, description="threshold levels L of the temporal code; default T (authors' choice)"
    )

    @model_validator(mode="after")
    def _steps_fit(self) -> "EncodingConfig":
        if self.direct_steps > self.num_steps:
            raise ValueError(
                f"direct_steps={self.direct_steps} exceeds num_steps={self.num_steps}; "
                f"allowed: 0..{self.num_steps}"
            )
        if self.scheme == "direct" and self.direct_steps not in (0, self.num_steps):
            raise ValueError("scheme 'direct' needs direct_steps equal to num_steps (or 0)")
        return self


# neuron.adaptive's named variant: the authors' ablation (their ASNN=False) keeps the per-step
# leak and gain and drops only the learned readout scale (model.learnable_readout false).
FIXED_READOUT = "fixed_readout"


class NeuronConfig(Section):
    adaptive: Literal[True, False, "fixed_readout"] = Field(
        True, description="true: per-step learned leak and gain (ASNN); false: one shared pair (our baseline); "
        "fixed_readout: per-step leak and gain, readout scale fixed at 1 (the authors' ASNN=False ablation)")
    threshold: float = Field(1.0, gt=0.0, description="firing threshold theta")
    reset: Literal["soft", "hard"] = Field("soft", description="reset by subtraction or to zero")
    detach_reset: bool = Field(False, description="stop gradients through the reset")
    surrogate: Literal["sigmoid", "atan"] = Field("sigmoid", description="surrogate gradient of the spike")
    alpha: Optional[float] = Field(None, gt=0.0, description="surrogate sharpness; default per surrogate")
    init_leak: float = Field(0.5, description="initial leak lambda")
    init_gain: float = Field(0.5, description="initial input gain gamma")
    backend: Literal["fused", "loop"] = Field("fused", description="multi-step kernel or plain step loop")


# Model factory keywords that asnn_dist/models/build.py fills from other config fields.
MODEL_KEYS_FROM_CONFIG = {
    "num_classes": "data.num_classes", "in_channels": "data.in_channels", "image_size": "data.image_size",
    "encoding": "encoding", "neuron": "neuron", "learnable_readout": "model.learnable_readout",
}
# How a model runs: applied by models/execution.py after the model is built, not keywords of
# any model (model.options naming one is pointed here).
EXECUTION_KEYS_FROM_CONFIG = {
    "time_segment": "checkpoint.time_segment", "time_levels": "checkpoint.time_levels",
    "time_states": "checkpoint.time_states", "pack_spikes": "checkpoint.pack_spikes",
}


class ModelConfig(Section):
    name: str = Field("lenet_asnn", description="registered model name (asnn-dist models list)")
    learnable_readout: bool = Field(True, description="learned per-step readout scale (ASNN); "
                                    "neuron.adaptive=fixed_readout sets it false")
    options: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments of the model factory"
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in MODELS:  # declared names: no model module (and no torch) is imported
            raise ValueError(MODELS.unknown_message(name))
        return name

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Every key must be a keyword of the model's factory that no other field already sets,
        so a typo fails at ``config check`` instead of deep inside model construction."""
        name = info.data.get("name")
        keywords = MODELS.keywords(name) if name in MODELS else None
        if keywords is None:
            return options
        allowed = [k for k in keywords if k not in MODEL_KEYS_FROM_CONFIG]
        set_elsewhere = {**MODEL_KEYS_FROM_CONFIG, **EXECUTION_KEYS_FROM_CONFIG}
        for key in options:
            if key in set_elsewhere:
                raise PydanticCustomError(
                    "option_from_config", "{key}: set by {field}, not by model.options (allowed keys: {allowed})",
                    {"key": key, "field": set_elsewhere[key], "allowed": ", ".join(allowed)})
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean 'model.options.{close[0]}'?" if close else ""
                raise PydanticCustomError(
                    "unknown_option", "{key}: unknown key of model '{model}'{hint} (allowed keys: {allowed})",
                    {"key": key, "model": name, "hint": hint, "allowed": ", ".join(allowed)})
        return options


class OptimConfig(Section):
    name: Literal["adamw", "sgd", "lamb"] = Field("adamw", description="optimizer")
    lr: float = Field(2e-3, gt=0.0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0.0, description="final learning rate of the cosine schedule")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    micro_batch_size: int = Field(32, ge=1, description="samples per rank per forward")
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="optional check: must equal micro_batch_size x grad_accum_steps x run.num_workers"
    )
    grad_accum_steps: int = Field(1, ge=1, description="micro batches per optimizer step")
    grad_clip: float = Field(0.0, ge=0.0, description="gradient norm clip (0 = off)")
    epochs: int = Field(10, ge=1, description="training epochs")
    warmup_steps: int = Field(0, ge=0, description="linear warmup optimizer steps")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the loss")


class EngineConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="training precision")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state offload to CPU")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU")
    steps_per_print: int = Field(1000, ge=1, description="DeepSpeed's own log cadence")


class CheckpointConfig(Section):
    time_segment: int = Field(0, ge=0, description="time steps per activation-checkpoint segment (0 = off)")
    time_levels: Literal[1, 2] = Field(2, description="1: keep every segment boundary state; 2: also group segments (~2 sqrt(n) states, one more forward)")
    time_states: Optional[int] = Field(None, ge=0, description="keep at most N boundary states alive on the binomial (revolve) schedule, fewest recomputed steps for that memory; overrides time_levels (default: off)")
    pack_spikes: bool = Field(True, description="layers that read spikes keep them for backward as 1 bit (uint8 for spike counts): lossless, less activation memory")
    every_steps: int = Field(0, ge=0, description="save a training checkpoint every N optimizer steps (0 = each epoch)")
    keep_last: int = Field(2, ge=1, description="training checkpoints kept")


class RunConfig(Section):
    name: Optional[str] = Field(None, description="stable run name: rerunning with the same name resumes from its last checkpoint; default <name>-<timestamp> (a fresh run)")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts before giving up (-1 = forever)")
    storage_path: Optional[str] = Field(None, description="Ray Train storage (local path or s3://); default <workdir>/ray_results")
    ray_address: Optional[str] = Field(None, description="Ray cluster address; default: RAY_ADDRESS or a local instance")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes: PACK fills nodes, SPREAD/STRICT_SPREAD put them on different nodes")
    log_every_steps: int = Field(10, ge=1, description="metric logging cadence in optimizer steps")
    eval_every_steps: int = Field(0, ge=0, description="evaluate every N optimizer steps (0 = at each epoch end only)")
    spike_stats: bool = Field(True, description="firing rates, synaptic operations and energy during evaluation")
    progress: bool = Field(True, description="progress bar on rank 0")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Ray Train's own log level")


class S3Config(Section):
    endpoint_url: Optional[str] = Field(
        None, description="S3-compatible endpoint (e.g. http://minio:9000); default AWS_ENDPOINT_URL or AWS"
    )
    region: Optional[str] = Field(None, description="S3 region; default from the AWS config chain")


class TrackingConfig(Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db")
    experiment: str = Field("asnn-dist", description="MLflow experiment name")
    artifact_location: Optional[str] = Field(
        None, description="artifact root of a new experiment; default <workdir>/mlartifacts for a local "
        "database URI, the server's own choice for http(s) servers"
    )
    registered_model: Optional[str] = Field("asnn-lenet", description="registry name; null = do not register")
    alias: str = Field("champion", description="alias given to a newly registered version")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: Optional[str]) -> Optional[str]:
        if uri and re.match(r"^[a-z+]+://[^/@\s]+:[^/@\s]+@", uri):
            raise ValueError(
                "credentials in the tracking URI; put them in MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD (or the database's own auth) instead"
            )
        return uri


DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SchedulerConfig(Section):
    name: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early; fifo runs every trial to the end")
    time_attr: Literal["epoch", "evaluation"] = Field(
        "epoch", description="what ASHA counts: epochs or evaluations reported by the workers (never Tune iterations)")
    grace_period: int = Field(1, ge=1, description="ASHA: time units every trial gets before it can be stopped")
    max_t: Optional[int] = Field(None, ge=1, description="ASHA: time units of a full trial; default the longest optim.epochs (evaluations: epochs x evaluations per epoch)")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/reduction_factor of the trials at each rung")


class SearchAlgConfig(Section):
    name: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: grid values x num_samples random draws; grid: grid values only; optuna: TPE (extra 'optuna')")
    seed: int = Field(0, description="seed of the sampler (the same seed draws the same trials)")
    max_resample: int = Field(20, ge=0, description="random draws the schema forbids are redrawn up to this many times, then skipped")


class TuneConfig(Section):
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="search name: rerunning with the same name resumes the search; default <name>-search")
    space: dict[str, Any] = Field(default_factory=dict, description="dotted config key -> {grid|choice: [...]}, {uniform|loguniform|randint: [low, high]} or a fixed value")
    num_samples: int = Field(1, ge=1, description="random draws per grid point (optuna: trials in all)")
    metric: str = Field("val_top1", description="metric the workers report that the search optimises")
    mode: Literal["max", "min"] = Field("max", description="maximise or minimise the metric")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search: SearchAlgConfig = Field(default_factory=SearchAlgConfig)
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="trials running at once; default what the cluster's CPUs/GPUs fit")
    trial_driver_cpus: float = Field(0.0, ge=0.0, le=1.0, description="CPUs each trial's driver reserves (its workers reserve their own CPUs; 0 keeps every CPU for workers)")
    trial_driver_memory_mb: int = Field(256, ge=1, description="memory (MiB) each trial's driver reserves: Ray needs some request, and memory takes no worker's slot")
    register_best: bool = Field(True, description="register the best finished trial's model (the alias moves only if it is better)")


class ExperimentConfig(Section):
    name: str = Field("asnn-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="experiment name")
    seed: int = Field(0, description="global seed")
    workdir: str = Field("asnn-work", description="folder for shards, MLflow, Ray results (relative to cwd)")
    data: DataConfig = Field(default_factory=DataConfig)
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)
    neuron: NeuronConfig = Field(default_factory=NeuronConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    s3: S3Config = Field(default_factory=S3Config)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: Optional[TuneConfig] = Field(None, description="hyperparameter search (asnn-dist tune); unused by train")

    @property
    def global_batch_size(self) -> int:
        """micro batch x accumulation x world size (what DeepSpeed checks)."""
        return self.optim.micro_batch_size * self.optim.grad_accum_steps * self.run.num_workers

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        o = self.optim
        if o.global_batch_size is not None and o.global_batch_size != self.global_batch_size:
            raise ValueError(
                f"optim.global_batch_size={o.global_batch_size} but micro_batch_size x grad_accum_steps x "
                f"run.num_workers = {o.micro_batch_size} x {o.grad_accum_steps} x {self.run.num_workers} = "
                f"{self.global_batch_size}; change one of them"
            )
        if self.engine.precision == "fp16" and not self.run.use_gpu:
            raise ValueError("engine.precision=fp16 needs run.use_gpu=true; allowed on CPU: fp32, bf16")
        if self.engine.offload_params and self.engine.zero_stage != 3:
            raise ValueError("engine.offload_params needs engine.zero_stage=3")
        if self.neuron.adaptive == FIXED_READOUT and self.model.learnable_readout:
            if "learnable_readout" in self.model.model_fields_set:
                raise ValueError("neuron.adaptive=fixed_readout fixes the readout scale at 1, but "
                                 "model.learnable_readout=true; drop one of them")
            self.model.learnable_readout = False  # what the named variant means
        return self
