import importlib
import os
from pathlib import Path
from typing import NamedTuple

# As in pipeline/__init__.py: passive OpenMP waiting, set before anything imports torch, so
# tests running beside subprocesses (loader workers, two-process runs) don't starve them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: more threads only contend (training here ran 10x slower on a busy 2-core box).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Ran(NamedTuple):
    returncode: int
    stderr: str


@pytest.fixture
def stage_main(capsys, monkeypatch):
    """``stage_main(name, *args, cwd=...)``: ``pipeline.<name>.main(args)`` run in this process, in
    ``cwd``; its exit code and stderr. What the command line runs, without a new interpreter
    importing torch (5-7 s a call on 2 cores); the command line's own path keeps its subprocess
    tests. The Accelerate state a stage may create is reset after."""
    from pipeline.device import reset_accelerate

    def run(name: str, *args: str, cwd: Path) -> Ran:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = importlib.import_module(f"pipeline.{name}").main(list(args))
        finally:
            reset_accelerate()
        return Ran(code, capsys.readouterr().err)
    return run
