"""Deployment files: the Dockerfile and its lock file, the launchers (SLURM, SkyPilot, torchrun).

No Docker engine and no SLURM here: the Dockerfile is checked against the lock file and CI by
parsing; the SLURM script runs for real with stand-ins for ``srun`` and ``scontrol``, and the
multi-node commands it prints train for real, as two "machines" on this one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from procs import free_port, max_difference, weights
from shardgen import write_frame_dataset

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
TORCHRUN = ROOT / "scripts" / "torchrun" / "train.sh"
SKYPILOT = ROOT / "scripts" / "skypilot" / "train.yaml"
MULTI_NODE = ROOT / "configs" / "accelerate" / "multi-node.yaml"
BASH = shutil.which("bash")


# ---------------------------------------------------------------------------------------------
# Docker


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def pip_installs(text: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` in a shell text."""
    out = []
    for command in re.split(r"&&|;|\n", text):
        words = shlex.split(command, comments=True)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                out.append(words[i + 2 :])
    return out


def constraints_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--constraint")]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            out[normalise(name)] = version
    return out


def test_docker_installs_with_the_lock_file_as_ci_does():
    ci = pip_installs((ROOT / ".ci" / "run").read_text())
    docker = [args for word, rest in dockerfile() if word == "RUN" for args in pip_installs(rest)]
    assert ci and docker
    # Every install, in CI and in the image, is constrained by the one lock file.
    assert {f for args in ci for f in constraints_of(args)} == {"constraints.txt"}
    assert all(constraints_of(args) == ["constraints.txt"] for args in docker), docker
    # The whole file goes into the image, untouched (no RUN edits or filters it)...
    copies = [rest.split() for word, rest in dockerfile() if word == "COPY" and "--from" not in rest]
    assert any("constraints.txt" in args[:-1] for args in copies)
    assert not [rest for word, rest in dockerfile()
                if word == "RUN" and "constraints.txt" in rest and not pip_installs(rest)]
    assert not dockerignored("constraints.txt")
    # ... and it pins every dependency that gets installed, so every pinned line is what's used.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = project["dependencies"] + project["optional-dependencies"]["export"]
    locked = pins()
    for requirement in required:
        name = normalise(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))
        assert name in locked, f"{requirement} is installed but not pinned in constraints.txt"


def test_docker_python_is_the_lock_files():
    # The lock file was made with the Python CI uses ("Python 3.11" in .ci/run).
    ci_python = re.search(r"Python (3\.\d+)", (ROOT / ".ci" / "run").read_text()).group(1)
    args = dict(re.match(r"(\w+)(?:=(.*))?", rest).groups() for word, rest in dockerfile() if word == "ARG")
    bases = []
    for word, rest in dockerfile():
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
            bases.append(image)
    assert bases and all(re.match(rf"python:{re.escape(ci_python)}(-|$)", b) for b in bases), bases
    assert "3.11" == ci_python


def test_docker_runs_as_a_user_in_the_project():
    instructions = dockerfile()
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    workdir = [rest for word, rest in instructions if word == "WORKDIR"][-1]
    assert workdir.startswith("/home/") and "COPY" in [w for w, _ in instructions]
    assert any(w == "CMD" and "dvc" in rest for w, rest in instructions)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """``(excluding, regex)`` per line of .dockerignore, in order (Docker's matching rules)."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excluding = not line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((excluding, re.compile(regex + r"\Z")))
    return out


def dockerignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out (it, or a directory above it, is excluded)."""
    patterns = dockerignore_patterns()
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        verdict = False
        for excluding, regex in patterns:
            if regex.match(prefix):
                verdict = excluding
        if verdict:
            return True
    return False


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "data/shards/voc/train-000000.tar", "data/sample/voc/x.jpg",
    "models/ssdlite_voc.pt", "checkpoints/tiny/step-00000002/model.safetensors", "runs/tiny/events",
    "reports/x/a.png", "ssd/__pycache__/boxes.cpython-311.pyc", ".dvc/cache/files/md5/ab/cd",
    ".pytest_cache/v/x", "ssd_pipeline.egg-info/PKG-INFO", "export/model.onnx",
])
def test_dockerignore_excludes(path):
    assert dockerignored(path)


def test_dockerignore_keeps_what_the_image_needs():
    needed = ["constraints.txt", "pyproject.toml", "README.md", "dvc.yaml", "dvc.lock", "params.yaml",
              ".dvc/config", "ssd/models/ssd.py", "pipeline/train.py", "configs/accelerate/default.yaml",
              "configs/accelerate/multi-node.yaml", "scripts/slurm/train.sbatch"]
    for word, rest in dockerfile():  # every COPY source from the build context
        if word == "COPY" and "--from" not in rest:
            needed += [a for a in rest.split()[:-1] if not a.startswith("--") and a != "."]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not dockerignored(path), path


# ---------------------------------------------------------------------------------------------
# Launcher files


def test_skypilot_task():
    task = yaml.safe_load(SKYPILOT.read_text())
    resources = task["resources"]
    assert resources["use_spot"] is True and resources["accelerators"]
    recovery = resources["job_recovery"]
    assert recovery["max_restarts_on_errors"] >= 1 and 75 in recovery["recover_on_exit_codes"]
    # The checkpoints live in a mounted bucket, and the training writes them there.
    mount, spec = next((p, s) for p, s in task["file_mounts"].items() if "checkpoints" in p)
    assert spec["mode"] in ("MOUNT", "MOUNT_CACHED") and spec["name"] == "${CHECKPOINT_BUCKET}"
    run = task["run"]
    assert "-m pipeline.train" in run and f"checkpoints_dir={mount}" in run and "--restart" not in run
    # accelerate launch says 1 when its workers exit 75: the supervisor passes the 75 to SkyPilot.
    assert "python -m pipeline.supervise accelerate launch" in run
    assert "--num_machines" in run and "SKYPILOT_NODE_RANK" in run
    assert [args for args in pip_installs(task["setup"]) if constraints_of(args) == ["constraints.txt"]]
    for script in (task["setup"], run):
        assert subprocess.run([BASH, "-n"], input=script, text=True).returncode == 0


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    multi = load_config_from_file(str(MULTI_NODE))
    assert multi.distributed_type == "MULTI_GPU" and multi.num_machines > 1 and multi.rdzv_backend == "static"
    assert yaml.safe_load(MULTI_NODE.read_text())["main_process_port"] == 29500
    single = load_config_from_file(str(ROOT / "configs" / "accelerate" / "default.yaml"))
    assert single.num_machines == 1


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


def test_sbatch_asks_for_requeue_and_an_early_signal():
    headers = dict(
        (m.group(1), m.group(2)) for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M)
    )
    assert "requeue" in headers
    lead = int(re.fullmatch(r"B:TERM@(\d+)", headers["signal"]).group(1))
    # The launcher must let its workers save before SLURM's own kill at the time limit.
    timeout = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", SBATCH.read_text()).group(1))
    assert 0 < timeout < lead
    assert headers["ntasks-per-node"] == "1"  # one accelerate launcher per node


# ---------------------------------------------------------------------------------------------
# SLURM dry run


def tool_dir(tmp_path: Path, *fakes: tuple[str, str]) -> Path:
    """A PATH directory with the few real tools the scripts use, plus fake ones; no SLURM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("tr", "sed", "grep", "dirname", "hostname", "cat", "sleep", "env"):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    (bin_dir / "python").unlink(missing_ok=True)
    (bin_dir / "python").symlink_to(sys.executable)
    for name, body in fakes:
        (bin_dir / name).write_text("#!" + BASH + "\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(script: Path, env: dict, *args: str, path: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), *args], env={"PATH": path, "HOME": str(ROOT), **env},
                          capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize("rank", [0, 2])
def test_slurm_dry_run_command(tmp_path, rank):
    env = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu-a,gpu-b,gpu-c", "SLURM_NODEID": str(rank),
           "SLURM_GPUS_ON_NODE": "4", "MAIN_PORT": "29555"}
    result = run_script(SBATCH, env, "--section", "train_voc", "--set", "optim.lr=0.002",
                        path=str(tool_dir(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "python", "-m", "pipeline.supervise",  # hands the workers' exit code 75 to the batch shell
        "accelerate", "launch", "--config_file", "configs/accelerate/multi-node.yaml",
        "--num_machines", "3", "--machine_rank", str(rank), "--main_process_ip", "gpu-a",
        "--main_process_port", "29555", "--num_processes", "12",
        "-m", "pipeline.train", "--section", "train_voc", "--set", "optim.lr=0.002",
    ]


def test_slurm_dry_run_expands_the_node_list_with_scontrol(tmp_path):
    scontrol = ('[[ "$1 $2" == "show hostnames" && "$3" == "gpu[07-08]" ]] || exit 1\n'
                "printf 'gpu07\\ngpu08\\n'\n")
    env = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "1",  # no SLURM_NODEID
           "SLURM_JOB_ID": "123456"}
    result = run_script(SBATCH, env, path=str(tool_dir(tmp_path, ("scontrol", scontrol))))
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout)[3:]  # after "python -m pipeline.supervise"
    flags = dict(zip(cmd[2:14:2], cmd[3:14:2]))
    assert flags == {"--config_file": "configs/accelerate/multi-node.yaml", "--num_machines": "2",
                     "--machine_rank": "1", "--main_process_ip": "gpu07", "--main_process_port": "23456",
                     "--num_processes": "2"}  # no GPU count anywhere: one process per node
    assert cmd[-4:] == ["-m", "pipeline.train", "--section", "train_voc"]  # the default


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_NODELIST": "gpu[1-4]"}, "needs scontrol"),
    ({"SLURM_JOB_NODELIST": "a,b", "SLURM_NODEID": "2"}, "node rank '2' is not in 0..1"),
    ({}, "SLURM_JOB_NODELIST is not set"),
])
def test_slurm_dry_run_errors(tmp_path, env, message):
    result = run_script(SBATCH, {"DRY_RUN": "1", **env}, path=str(tool_dir(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr


def test_slurm_jobs_sharing_a_first_node_get_their_own_ports(tmp_path):
    ports = set()
    for job in ("70001", "70002"):
        env = {"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NODEID": "0", "SLURM_JOB_ID": job}
        cmd = shlex.split(run_script(SBATCH, env, path=str(tool_dir(tmp_path))).stdout)
        ports.add(int(cmd[cmd.index("--main_process_port") + 1]))
    assert len(ports) == 2 and all(1024 < p < 65536 for p in ports)


SRUN_STUB = """trap 'kill $pid; exit $STUB_CODE' TERM
sleep 30 &
pid=$!
: > "$STUB_DIR/started"
wait
"""
SCONTROL_STUB = """echo "$@" >> "$STUB_DIR/scontrol"
exit ${STUB_REQUEUE_RC:-0}
"""


@pytest.mark.parametrize("code, requeue_rc, exits, requeued", [
    (75, 0, 0, True),     # saved and stopped: requeued, the next run resumes
    (143, 0, 0, True),    # killed by the signal before it could save: requeued too
    (0, 0, 0, False),     # finished meanwhile (its checkpoints are gone): not rerun from scratch
    (2, 0, 2, False),     # a bad config: not requeued 50 times
    (75, 1, 75, True),    # requeue failed: 75, not the 0 SLURM records as COMPLETED
])
def test_the_batch_shell_requeues_only_a_run_stopped_to_be_resumed(tmp_path, code, requeue_rc, exits, requeued):
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "scripts").symlink_to(ROOT / "scripts")
    bin_dir = tool_dir(tmp_path, ("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PROJECT_DIR": str(root), "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "a,b", "STUB_DIR": str(tmp_path), "STUB_CODE": str(code),
           "STUB_REQUEUE_RC": str(requeue_rc)}
    proc = subprocess.Popen([BASH, str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # SLURM's early signal before the time limit
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == exits, err
    assert (tmp_path / "scontrol").exists() == requeued, err


def test_torchrun_dry_run_command(tmp_path):
    env = {"DRY_RUN": "1", "NNODES": "2", "NPROC_PER_NODE": "8", "RDZV_ENDPOINT": "node0:29400"}
    result = run_script(TORCHRUN, env, "--section", "train_voc", path=str(tool_dir(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "python", "-m", "pipeline.supervise",
        "torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "node0:29400", "--rdzv_id", "ssd-train", "--max_restarts", "0",
        "-m", "pipeline.train", "--section", "train_voc",
    ]


# ---------------------------------------------------------------------------------------------
# The commands, run for real: tiny training, several processes on this machine's CPU.

TRAIN = {
    "name": "tiny",
    "model": {"name": "ssdlite_mobilenet_v2", "image_size": 64, "width_mult": 0.25},
    "data": {"shards": "shards", "batch_size": 2, "num_workers": 0, "streams": 2, "shuffle_buffer": 4},
    "optim": {"lr": 0.003, "warmup_steps": 2},
    "steps": 4,
    "checkpoint_every": 1000,
    "log_every": 1,
}


def project(tmp_path: Path, **overrides) -> Path:
    """A project directory: tiny shards, params.yaml with ``train``, what the SLURM script checks for."""
    write_frame_dataset(tmp_path / "shards", {"train": [6, 5], "val": [4]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {**TRAIN, **overrides}}))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    return tmp_path


def run_env(bin_dir: Path, **extra: str) -> dict:
    venv_bin = str(Path(sys.executable).parent)  # accelerate, torchrun
    return {"PATH": f"{bin_dir}:{venv_bin}:/usr/bin:/bin", "HOME": str(bin_dir.parent), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def metrics(cwd: Path) -> dict:
    return json.loads((cwd / "metrics" / "train-tiny.json").read_text())


def node_commands(tmp_path: Path, env: dict) -> list[list[str]]:
    """The two node commands of the SLURM script's dry run (both nodes on this machine)."""
    out = []
    for rank in (0, 1):
        cmd = run_script(SBATCH, {**env, "SLURM_NODEID": str(rank), "DRY_RUN": "1"}, "--section", "train",
                         path=env["PATH"])
        assert cmd.returncode == 0, cmd.stderr
        out.append(shlex.split(cmd.stdout))
    return out


def start_nodes(commands: list[list[str]], cwd: Path, env: dict) -> list[subprocess.Popen]:
    return [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for c in commands]


def trace_lines(cwd: Path) -> int:
    path = cwd / "runs" / "tiny" / "trace-rank0.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_two_machines_are_preempted_and_resume_to_the_one_machine_weights(tmp_path):
    """The SLURM script's two node commands (one process each, this machine standing in for both)
    train, get SIGTERM, exit 75 each, are rerun, resume, and end with the weights of a one-machine
    two-process run (the same global batch)."""
    steps = 24
    bin_dir = tool_dir(tmp_path)
    base = run_env(bin_dir, ACCELERATE_CONFIG=str(MULTI_NODE), SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
                   SLURM_GPUS_ON_NODE="1")
    one = project(tmp_path / "one-machine", steps=steps)
    reference = subprocess.run(
        [sys.executable, "-m", "pipeline.supervise", "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(free_port()), "-m", "pipeline.train"], cwd=one, env=base, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    cwd = project(tmp_path / "two-machines", steps=steps, trace=True)
    env = {**base, "MAIN_PORT": str(free_port())}
    nodes = start_nodes(node_commands(tmp_path, env), cwd, env)
    while all(p.poll() is None for p in nodes) and trace_lines(cwd) < 3:
        time.sleep(0.05)
    for p in nodes:
        p.send_signal(signal.SIGTERM)  # a spot preemption reaches every machine
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [75, 75], outputs[0][-3000:] + outputs[1][-3000:]
    saved = sorted((cwd / "checkpoints" / "tiny").glob("step-*"))
    assert saved and int(saved[-1].name.split("-")[1]) < steps and not (cwd / "models" / "tiny.pt").exists()

    env = {**base, "MAIN_PORT": str(free_port())}
    nodes = start_nodes(node_commands(tmp_path, env), cwd, env)
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f"resumed from checkpoints/tiny/{saved[-1].name}" in outputs[0]
    assert metrics(cwd)["world_size"] == 2 and metrics(cwd)["steps"] == steps
    assert max_difference(weights(cwd / "models" / "tiny.pt"), weights(one / "models" / "tiny.pt")) < 1e-5


@pytest.mark.slow
def test_torchrun_script_trains_and_hands_on_the_preemption_code(tmp_path):
    cwd = project(tmp_path / "project", steps=40, trace=True)
    env = run_env(tool_dir(tmp_path), NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                  PROJECT_DIR=str(cwd))
    first = subprocess.Popen([BASH, str(TORCHRUN), "--section", "train"], env={"HOME": str(ROOT), **env},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while first.poll() is None and trace_lines(cwd) < 2:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # the script has become pipeline.supervise (exec)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 75, out[-3000:]  # torchrun alone exits 1
    env["RDZV_ENDPOINT"] = f"127.0.0.1:{free_port()}"
    result = run_script(TORCHRUN, env, "--section", "train", path=env["PATH"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from checkpoints/tiny/step-" in result.stderr
    assert metrics(cwd)["world_size"] == 2 and metrics(cwd)["steps"] == 40


# srun stand-in: one task (this machine is node 0), options dropped, run in place.
FAKE_SRUN = 'while [[ "$1" == --* ]]; do shift; done\nexport SLURM_NODEID=0 SLURM_PROCID=0\nexec "$@"\n'
# scontrol stand-in: records what it was asked; expands comma-separated lists.
FAKE_SCONTROL = ('echo "$*" >> "$SCONTROL_LOG"\n'
                 'if [[ "$1 $2" == "show hostnames" ]]; then tr "," "\\n" <<<"$3"; fi\n')


@pytest.mark.slow
def test_slurm_job_requeues_on_sigterm_and_resumes(tmp_path):
    """SIGTERM to the batch shell (the time-limit warning): checkpoint, requeue; the rerun resumes."""
    steps = 60
    cwd = project(tmp_path / "project", steps=steps, trace=True)
    bin_dir = tool_dir(tmp_path, ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL))
    log = tmp_path / "scontrol.log"
    env = run_env(bin_dir, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(cwd),
                  SLURM_GPUS_ON_NODE="1", MAIN_PORT=str(free_port()), ACCELERATE_CONFIG=str(MULTI_NODE),
                  SCONTROL_LOG=str(log))
    first = subprocess.Popen([BASH, str(SBATCH), "--section", "train"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trace = cwd / "runs" / "tiny" / "trace-rank0.jsonl"
    while first.poll() is None and not (trace.exists() and trace.read_text().count("\n") >= 2):
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # only the batch shell, as --signal=B:TERM does
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    assert "stopped (exit 75): requeueing job 4242" in out  # the training's own code, through the launcher
    assert "requeue 4242" in log.read_text().splitlines(), out[-3000:]
    saved = sorted((cwd / "checkpoints" / "tiny").glob("step-*"))
    assert saved and (saved[-1] / "meta.json").is_file()
    assert int(saved[-1].name.split("-")[1]) < steps
    assert not (cwd / "models" / "tiny.pt").exists()

    # SLURM starts the requeued job: the same script, the same arguments.
    second = subprocess.run([BASH, str(SBATCH), "--section", "train"], cwd=tmp_path,
                            env={**env, "SLURM_RESTART_COUNT": "1", "MAIN_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from checkpoints/tiny/{saved[-1].name}" in second.stderr
    assert metrics(cwd)["steps"] == steps and (cwd / "models" / "tiny.pt").is_file()
    assert log.read_text().count("requeue") == 1  # a finished run is not requeued
