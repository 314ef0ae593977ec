"""pipeline.supervise: which exit code a supervised launcher ends with, and the reports behind it.

The real launchers under SIGTERM and Ctrl-C are tested with training runs (test_train.py,
test_deploy.py); here the rule itself, and a stand-in launcher that turns its stage's code into 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.supervise import exit_code

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("launcher, reports, expected", [
    (0, [], 0),                 # not a stage: the command's own code
    (3, [], 3),
    (1, [75, 75], 75),          # accelerate launch's 1 over workers that were preempted
    (1, [75, None], 75),        # one worker killed while the other saved: rerun resumes
    (1, [2, 2], 2),             # a config error on every rank
    (1, [2, None], 2),          # a bad input on one rank, the other killed by the launcher
    (1, [1, 2], 2),             # ... or failed in its next collective (gloo: connection closed by peer)
    (1, [0, 2, 75], 2),
    (1, [1, None], 1),          # not agreed: the launcher's
    (1, [1, 75], 1),            # a real failure is not a preemption
    (0, [0, 0], 0),
    (0, [0, None], 1),          # the launcher claims success, a stage process vanished
    (137, [None, None], 137),
])
def test_exit_code_rule(launcher, reports, expected):
    assert exit_code(launcher, reports) == expected


LAUNCHER = """
import subprocess, sys
# A launcher like accelerate launch's: runs the stage, reports any failure as 1.
code = subprocess.call([sys.executable, "-c", sys.argv[1]])
sys.exit(1 if code else 0)
"""
STAGE = """
from pipeline.stage import run
run(lambda: {code})
"""


@pytest.mark.parametrize("code", [0, 2, 75])
def test_the_stage_code_comes_through_a_launcher_that_hides_it(tmp_path, code):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stage = STAGE.format(code=code) + "import sys; sys.exit(1 if {code} else 0)\n".format(code=code)
    bare = subprocess.run([sys.executable, str(launcher), stage], env=env)
    assert bare.returncode == (1 if code else 0)
    supervised = subprocess.run([sys.executable, "-m", "pipeline.supervise", sys.executable, str(launcher), stage],
                                env=env)
    assert supervised.returncode == code


def test_a_missing_command_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "pipeline.supervise", "no-such-launcher", "x"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: no-such-launcher: cannot run it (No such file or directory)"


FORWARDING_LAUNCHER = """
import signal, subprocess, sys
# Like accelerate launch: passes a SIGTERM on to its worker, then reports any failure as 1.
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
signal.signal(signal.SIGTERM, lambda *_: worker.send_signal(signal.SIGTERM))
sys.exit(1 if worker.wait() else 0)
"""
SLOW_STAGE = """
import os, time
from pipeline.stage import run
def body():
    open({marker!r}, "w").write(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "unset"))
    time.sleep(60)  # a stage that doesn't save on SIGTERM (evaluate), or one still starting
run(body)
"""


def test_a_stop_before_any_stage_could_save_is_the_signals_code_not_a_bug(tmp_path):
    """The launcher's 1 ("a bug", counted against SkyPilot's restarts on errors) came through; and
    torch's launchers killed the workers 30 s after the stop, saved or not."""
    launcher, marker = tmp_path / "launcher.py", tmp_path / "started"
    launcher.write_text(FORWARDING_LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.supervise", "--grace", "5", sys.executable, str(launcher),
                             SLOW_STAGE.format(marker=str(marker))], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "5"  # the supervisor's grace, given to the launcher
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr


@pytest.mark.parametrize("grace", ["nan", "inf", "-5"])
def test_a_grace_that_is_no_time_is_a_usage_error(grace, capsys):
    """nan and inf were a ValueError traceback from the deadline; -5 was taken as no wait at all."""
    from pipeline.supervise import main

    with pytest.raises(SystemExit) as e:
        main(["--grace", grace, "true"])
    assert e.value.code == 2
    assert f"argument --grace: invalid seconds value: '{grace}'" in capsys.readouterr().err
