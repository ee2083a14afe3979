"""Static checks of every manifest in cluster/: they run on clusters this machine never sees, so a
RayJob that names a missing config or a bad --set key, a submitter that asks for a GPU, or an
inline credential must fail here, not an hour into a cluster's start-up.

``folder_problems`` (``rayjob_problems`` for every RayJob, ``credential_problems`` for every
file) is the one checker: cluster/ must give no problem, and the negative tests give it broken
copies written to tmp_path. Every RayJob in cluster/ is
found by kind, so a manifest added later is checked without editing this file."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DOCKERFILE = REPO / "docker" / "Dockerfile"

# The submitter's bash expands the entrypoint (KubeRay pastes it into `ray job submit ... -- `),
# and the head's shell runs it again: anything but plain words would change on the way.
SHELL_SPECIAL = re.compile(r"[$`;|&<>(){}\\'\"*?!#~]")
# The submitter only runs `ray job submit` and `ray job logs --follow`.
SUBMITTER_MAX_CPU = 1.0
SUBMITTER_MAX_MEMORY = 2 * 2**30

SECRET_NAME = re.compile(r"secret|passw|token|access_?key|api_?key|credential|private_?key", re.I)
# Keys that name a Kubernetes Secret or say how auth works, never hold one.
REFERENCE_KEYS = {"secretRef", "secretKeyRef", "secretName", "mode", "name", "optional"}
RAW_CREDENTIALS = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@"), "a password in a URL"),
    (re.compile(r"\b\w*(secret|passw|token|access_?key)\w*\s*=\s*[^\s$'\"{]", re.I), "NAME=credential"),
]


# --- reading -----------------------------------------------------------------------------------


def manifest_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def documents(folder: Path) -> Iterator[tuple[Path, Any]]:
    """Every YAML document of every manifest (kubectl accepts several per file, split by ---)."""
    for path in manifest_files(folder):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def objects_of_kind(folder: Path, kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in documents(folder) if isinstance(d, dict) and d.get("kind") == kind]


def dockerfile_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)[-1]


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("250m", "90", "1Gi", "512Mi") as a number (cores or bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return list(((pod_template or {}).get("spec") or {}).get("containers") or [])


# --- the checks ------------------------------------------------------------------------------------


def credential_problems(text: str, docs: list[Any]) -> list[str]:
    """Credentials written into a file: raw patterns in the text, inline secret-named values in YAML."""
    found = [f"{what} in the text" for pattern, what in RAW_CREDENTIALS if pattern.search(text)]

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])) and node["value"]:
                found.append(f"{where}: env {node['name']} has an inline value; use valueFrom.secretKeyRef")
            for key, value in node.items():
                if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != "" \
                        and SECRET_NAME.search(str(key)) and key not in REFERENCE_KEYS:
                    found.append(f"{where}.{key} holds a literal value")
                walk(value, f"{where}.{key}")
            if isinstance(node.get("runtimeEnvYAML"), str):
                try:  # a runtimeEnvYAML that does not parse is runtime_env_problems' to report
                    walk(yaml.safe_load(node["runtimeEnvYAML"]), f"{where}.runtimeEnvYAML")
                except yaml.YAMLError:
                    pass
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    for i, doc in enumerate(docs):
        walk(doc, f"doc{i}")
    return found


def runtime_env_problems(text: Any) -> list[str]:
    """runtimeEnvYAML must be a runtime env Ray accepts, with no local working_dir (no checkout
    exists on the submitter: the code is the image's) and env vars as strings."""
    from ray.runtime_env import RuntimeEnv

    if not isinstance(text, str):
        return ["runtimeEnvYAML is missing (a multi-line YAML string)"]
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"runtimeEnvYAML does not parse: {err}"]
    if not isinstance(env, dict):
        return ["runtimeEnvYAML is not a mapping"]
    problems = [f"runtimeEnvYAML: {key!r} is not a runtime env field" for key in env if key not in RuntimeEnv.known_fields]
    for key in ("working_dir", "py_modules"):
        values = env.get(key) or []
        for value in values if isinstance(values, list) else [values]:
            if "://" not in str(value):
                problems.append(f"runtimeEnvYAML: {key} {value!r} is a local path; the code is the image's")
    try:
        RuntimeEnv(**env)
    except Exception as err:  # Ray's own validation: type errors, bad field values
        problems.append(f"runtimeEnvYAML rejected by Ray: {err}")
    return problems


def entrypoint_problems(entrypoint: Any, repo: Path) -> tuple[list[str], Any]:
    """Parse the entrypoint with the package's own CLI parser and validate its config and
    --set overrides with the package's config loader. Returns (problems, config or None)."""
    from asnn_dist.cli import build_parser
    from asnn_dist.config import load_config

    if not isinstance(entrypoint, str) or not entrypoint.strip():
        return ["entrypoint is missing"], None
    if SHELL_SPECIAL.search(entrypoint):
        return [f"entrypoint {entrypoint!r} has shell syntax the submitter's bash would expand"], None
    argv = shlex.split(entrypoint)
    if argv[0] != "asnn-dist":
        return [f"entrypoint runs {argv[0]!r}, not asnn-dist"], None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text; the problem says it
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return [f"asnn-dist cannot parse the entrypoint arguments {argv[1:]}"], None
    validators: dict[str, Callable[..., Any]] = {"train": load_config, "tune": load_search_config}
    if args.command not in validators:
        return [f"no config check for `asnn-dist {args.command}` yet: add one to this test"], None
    config = repo / args.config
    if not config.is_file():
        return [f"entrypoint config {args.config} does not exist in the repository"], None
    try:
        cfg = validators[args.command](config, args.overrides)
    except Exception as err:  # the loader's ConfigError / UserError carry the message users see
        return [f"entrypoint config {args.config} with --set {args.overrides} is invalid: {err}"], None
    return [], cfg


def load_search_config(path: Path, overrides: list[str]) -> Any:
    """`asnn-dist tune`: the same loader (which checks tune.space key by key), and the search
    must have at least one trial the schema allows (what the command checks before starting)."""
    from asnn_dist.config import load_config
    from asnn_dist.config.space import check_space

    cfg = load_config(path, overrides)
    if cfg.tune is None or not cfg.tune.space:
        raise ValueError("`asnn-dist tune` needs a config with a tune.space")
    check_space(cfg)
    return cfg


def container_resources(container: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    res = container.get("resources") or {}
    return dict(res.get("requests") or {}), dict(res.get("limits") or {})


def group_problems(cluster_spec: dict[str, Any], where: str) -> list[str]:
    """Every Ray pod advertises what the node really gives it: requests equal limits (Ray takes
    the limit as its CPU/GPU/memory count) and rayStartParams do not contradict them."""
    problems = []
    if (cluster_spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}: authOptions.mode is not token")
    groups = [("head", cluster_spec.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", "?"), g) for g in cluster_spec.get("workerGroupSpecs") or []]
    for name, group in groups:
        pods = containers(group.get("template"))
        if not pods:
            problems.append(f"{where}: group {name} has no container")
            continue
        requests, limits = container_resources(pods[0])
        for key in ("cpu", "memory"):
            if key not in limits:
                problems.append(f"{where}: group {name} sets no {key} limit")
        for key in set(requests) | set(limits):
            if key not in requests or key not in limits or quantity(requests[key]) != quantity(limits[key]):
                problems.append(f"{where}: group {name} {key}: requests {requests.get(key)} != limits {limits.get(key)}")
        params = group.get("rayStartParams") or {}
        gpus = sum(quantity(v) for k, v in limits.items() if "gpu" in k)
        if "num-cpus" in params and "cpu" in limits and quantity(params["num-cpus"]) != quantity(limits["cpu"]):
            problems.append(f"{where}: group {name} num-cpus {params['num-cpus']} != cpu limit {limits['cpu']}")
        if "num-gpus" in params and quantity(params["num-gpus"]) != gpus:
            problems.append(f"{where}: group {name} num-gpus {params['num-gpus']} != GPU limit {gpus}")
    return problems


def advertised_custom_resources(group: dict[str, Any]) -> set[str]:
    names = set((group.get("resources") or {}))
    raw = (group.get("rayStartParams") or {}).get("resources")
    if raw:
        names |= set(json.loads(json.loads(raw) if raw.startswith('"') else raw))
    return names


def fit_problems(spec: dict[str, Any], cfg: Any, where: str) -> list[str]:
    """The run fits the cluster: enough GPUs (or CPUs) for run.num_workers, the workers of one
    pod fit its CPUs, and the driver's reservation lands on the head only."""
    cluster = spec["rayClusterSpec"]
    head = cluster.get("headGroupSpec") or {}
    workers = cluster.get("workerGroupSpecs") or []
    autoscale = bool(cluster.get("enableInTreeAutoscaling"))
    problems = []
    total_gpus = total_cpus = 0.0
    for group in workers:
        _, limits = container_resources((containers(group.get("template")) or [{}])[0])
        pods = group.get("maxReplicas" if autoscale else "replicas", 0) or 0
        gpus = sum(quantity(v) for k, v in limits.items() if "gpu" in k)
        cpus = quantity(limits.get("cpu", 0))
        total_gpus += pods * gpus
        total_cpus += pods * cpus
        per_pod = min(gpus, cfg.run.num_workers)
        if cfg.run.use_gpu and per_pod * cfg.run.cpus_per_worker > cpus:
            problems.append(f"{where}: {per_pod:g} workers x {cfg.run.cpus_per_worker} CPUs do not fit the "
                            f"{cpus:g} CPUs of a {group.get('groupName')} pod")
    if cfg.run.use_gpu and total_gpus < cfg.run.num_workers:
        problems.append(f"{where}: {cfg.run.num_workers} GPU workers but the worker groups have {total_gpus:g} GPUs")
    if not cfg.run.use_gpu and total_cpus < cfg.run.num_workers * cfg.run.cpus_per_worker:
        problems.append(f"{where}: {cfg.run.num_workers} workers need more than the {total_cpus:g} worker CPUs")

    num_cpus = spec.get("entrypointNumCpus")
    if not isinstance(num_cpus, (int, float)) or num_cpus <= 0:
        problems.append(f"{where}: entrypointNumCpus must reserve the driver's CPU (e.g. 1)")
    _, head_limits = container_resources((containers(head.get("template")) or [{}])[0])
    if isinstance(num_cpus, (int, float)) and num_cpus > quantity(head_limits.get("cpu", 0)):
        problems.append(f"{where}: entrypointNumCpus {num_cpus} is more than the head's CPUs")
    if spec.get("entrypointNumGpus"):
        problems.append(f"{where}: the driver must not reserve a GPU (entrypointNumGpus)")
    wanted = set(json.loads(spec.get("entrypointResources") or "{}"))
    if not wanted:
        problems.append(f"{where}: entrypointResources should name a head-only resource so the driver runs on the head")
    if wanted - advertised_custom_resources(head):
        problems.append(f"{where}: entrypointResources {sorted(wanted)} are not all advertised by the head group")
    for group in workers:
        if wanted & advertised_custom_resources(group):
            problems.append(f"{where}: worker group {group.get('groupName')} advertises the driver's resource")
    return problems


def submitter_problems(spec: dict[str, Any], where: str) -> list[str]:
    template = spec.get("submitterPodTemplate")
    pods = containers(template)
    if not pods:
        return [f"{where}: submitterPodTemplate with a small container is required (the default copies the head's resources)"]
    problems = []
    for container in pods:
        requests, limits = container_resources(container)
        name = container.get("name")
        if any("gpu" in key for key in (*requests, *limits)):
            problems.append(f"{where}: submitter container {name} asks for a GPU")
        if "cpu" not in requests or "memory" not in requests:
            problems.append(f"{where}: submitter container {name} sets no cpu/memory requests")
        if quantity(limits.get("cpu", "inf")) > SUBMITTER_MAX_CPU or quantity(limits.get("memory", "inf")) > SUBMITTER_MAX_MEMORY:
            problems.append(f"{where}: submitter container {name} may take more than 1 CPU / 2Gi")
    return problems


def rayjob_problems(doc: dict[str, Any], repo: Path, where: str = "RayJob") -> list[str]:
    """Every way a RayJob manifest of this project can be wrong without kubectl noticing."""
    spec = doc.get("spec") or {}
    where = f"{where} {(doc.get('metadata') or {}).get('name')}"
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{where}: apiVersion is not ray.io/v1")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: shutdownAfterJobFinishes must be true (the GPU cluster outlives the job otherwise)")
    if not isinstance(spec.get("rayClusterSpec"), dict):
        return problems + [f"{where}: rayClusterSpec is missing (a RayJob here creates its own cluster)"]
    problems += group_problems(spec["rayClusterSpec"], where)
    problems += [f"{where}: {p}" for p in runtime_env_problems(spec.get("runtimeEnvYAML"))]
    problems += submitter_problems(spec, where)
    head = containers((spec["rayClusterSpec"].get("headGroupSpec") or {}).get("template"))
    if not head or head[0].get("workingDir") != dockerfile_workdir():
        problems.append(f"{where}: the head container's workingDir must be the image's {dockerfile_workdir()} "
                        "(the entrypoint's config path is relative to it)")
    entry, cfg = entrypoint_problems(spec.get("entrypoint"), repo)
    problems += [f"{where}: {p}" for p in entry]
    if cfg is not None:
        problems += fit_problems(spec, cfg, where)
    return problems


def folder_problems(folder: Path, repo: Path = REPO) -> list[str]:
    """All problems of all RayJobs and credentials in a folder of manifests."""
    problems = []
    for path in manifest_files(folder):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        problems += [f"{path.name}: {p}" for p in credential_problems(path.read_text(), docs)]
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                problems += [f"{path.name}: {p}" for p in rayjob_problems(doc, repo)]
    return problems


# --- the repository's manifests ---------------------------------------------------------------


def test_every_manifest_parses():
    files = manifest_files(CLUSTER)
    assert {f.name for f in files} >= {"ray-cluster-aws.yaml", "kuberay-raycluster.yaml", "runtime_env.yaml",
                                       "kuberay-rayjob-train.yaml", "kuberay-rayjob-tune.yaml"}
    for path, doc in documents(CLUSTER):
        assert isinstance(doc, dict), path
        if "apiVersion" in doc:  # a Kubernetes object
            assert doc.get("kind") and (doc.get("metadata") or {}).get("name"), path
    assert objects_of_kind(CLUSTER, "RayJob"), "cluster/ should hold at least one RayJob"


RAYJOBS = objects_of_kind(CLUSTER, "RayJob")


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=[f"{p.name}:{(d.get('metadata') or {}).get('name')}" for p, d in RAYJOBS])
def test_rayjob_is_complete_and_its_entrypoint_config_is_valid(path, doc):
    assert rayjob_problems(doc, REPO) == []


def test_rayclusters_keep_token_auth_and_advertise_what_they_request():
    clusters = objects_of_kind(CLUSTER, "RayCluster")
    assert clusters
    for path, doc in clusters:
        assert group_problems(doc["spec"], path.name) == []
    versions = {d["spec"]["rayVersion"] for _, d in clusters}
    versions |= {d["spec"]["rayClusterSpec"]["rayVersion"] for _, d in RAYJOBS}
    assert len(versions) == 1, f"all manifests should name one Ray version (the image's), got {versions}"
    launcher = (CLUSTER / "ray-cluster-aws.yaml").read_text()
    assert "RAY_AUTH_MODE=token" in launcher and "get-auth-token --generate" in launcher


def test_no_credentials_in_cluster_or_docker_files():
    assert folder_problems(CLUSTER) == []
    for path in sorted((REPO / "docker").iterdir()):
        assert credential_problems(path.read_text(), []) == [], path


def test_runtime_env_file_is_a_valid_runtime_env():
    """cluster/runtime_env.yaml is uploaded from a checkout, so there working_dir '.' is right."""
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)


# --- the checker catches what it should ---------------------------------------------------------


def _entry(extra: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["spec"]["entrypoint"] = extra

    return mutate


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value

    return mutate


SUBMITTER = "spec.submitterPodTemplate.spec.containers.0"
WORKER = "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0"
BROKEN = {
    "bad --set key": (_entry("asnn-dist train configs/imagenet/spikformer-8-768-hybrid.yaml --set optim.lrr=1e-3"), "lrr"),
    "missing config": (_entry("asnn-dist train configs/imagenet/no-such-config.yaml"), "does not exist"),
    "bad value": (_entry("asnn-dist train configs/demo/digits-lenet-hybrid.yaml --set run.num_workers=0"), "invalid"),
    "shell variable": (_entry("asnn-dist train configs/demo/digits-lenet-hybrid.yaml --set name=$USER"), "shell"),
    "unknown command": (_entry("asnn-dist frobnicate"), "cannot parse"),
    "tune without space": (_entry("asnn-dist tune configs/cifar/spikformer-4-384-hybrid.yaml"), "tune.space"),
    "bad tune space key": (_entry("asnn-dist tune configs/tune/cifar10-encoding-mix.yaml --set tune.num_sample=3"), "num_samples"),
    "too few GPUs": (_entry("asnn-dist train configs/imagenet/spikformer-8-768-hybrid.yaml --set run.num_workers=64"), "GPUs"),
    "no shutdown": (_set("spec.shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes"),
    "auth off": (_set("spec.rayClusterSpec.authOptions", {"mode": "disabled"}), "authOptions.mode"),
    "submitter GPU": (_set(f"{SUBMITTER}.resources", {"requests": {"cpu": "1", "memory": "1Gi"},
                                                      "limits": {"nvidia.com/gpu": "1"}}), "asks for a GPU"),
    "big submitter": (_set(f"{SUBMITTER}.resources", {"requests": {"cpu": "4", "memory": "8Gi"},
                                                      "limits": {"cpu": "4", "memory": "8Gi"}}), "1 CPU"),
    "no entrypoint CPUs": (_set("spec.entrypointNumCpus", 0), "entrypointNumCpus"),
    "driver on workers": (_set("spec.rayClusterSpec.workerGroupSpecs.0.resources", {"asnn_driver": "1"}), "advertises"),
    "requests != limits": (_set(f"{WORKER}.resources.requests", {"cpu": "60", "memory": "1000Gi", "nvidia.com/gpu": "8"}),
                           "requests"),
    "runtime env int": (_set("spec.runtimeEnvYAML", "env_vars:\n  OMP_NUM_THREADS: 4\n"), "rejected by Ray"),
    "runtime env typo": (_set("spec.runtimeEnvYAML", "envvars:\n  A: '1'\n"), "not a runtime env field"),
    "local working_dir": (_set("spec.runtimeEnvYAML", "working_dir: .\n"), "local path"),
    "inline secret": (_set(f"{WORKER}.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc123"}]), "inline"),
    "secret in URL": (_set("spec.runtimeEnvYAML", "env_vars:\n  MLFLOW_TRACKING_URI: http://bob:hunter2@mlflow:5000\n"),
                      "URL"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_checker_catches_a_broken_rayjob_written_to_a_folder(name, tmp_path):
    mutate, expected = BROKEN[name]
    assert RAYJOBS
    doc = copy.deepcopy(RAYJOBS[0][1])
    mutate(doc)
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    problems = folder_problems(tmp_path)
    assert any(expected in p for p in problems), problems


def test_checker_finds_a_second_document_in_a_file(tmp_path):
    good = copy.deepcopy(RAYJOBS[0][1])
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "second"
    bad["spec"]["entrypoint"] = "asnn-dist train configs/demo/missing.yaml"
    (tmp_path / "two.yaml").write_text(yaml.safe_dump_all([good, bad], sort_keys=False))
    problems = folder_problems(tmp_path)
    assert len(problems) == 1 and "second" in problems[0], problems
