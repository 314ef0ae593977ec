import os

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
