"""The adapter layer's shared parts: the bounded worker map and the common records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from procs import RUN_OPENCV_POOL
from ssd.data.sources.decode import ordered_map
from ssd.data.sources.records import Frame, Listing, Obj, Video, classes, sample_key


def _square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_order_and_bounds_what_is_in_flight():
    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i

    with ordered_map(2, window=3) as imap:
        out = []
        for i, y in enumerate(imap(_square, items())):
            # Items are taken from the source only as results are consumed: never more
            # than `window` ahead, so memory does not grow with the dataset.
            assert len(pulled) - i <= 3
            out.append(y)
    assert out == [i * i for i in range(50)]
    with ordered_map(1) as imap:
        assert list(imap(_square, range(5))) == [0, 1, 4, 9, 16]


AFTER_OPENCV_THREADS = RUN_OPENCV_POOL + """
from ssd.data.sources.decode import ordered_map
from test_sources import _square
with ordered_map(2, window=3) as imap:
    print(list(imap(_square, range(6))))
print(cv2.getNumThreads())
"""


def test_the_worker_pool_starts_after_opencv_threads_ran_in_the_parent():
    """Workers forked from a process whose OpenCV thread pool had run waited forever in
    cv2.setNumThreads (it hung this suite's CI run); OpenCV's setting is restored after."""
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", AFTER_OPENCV_THREADS], cwd=tests.parent, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": f"{tests.parent}:{tests}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[0, 1, 4, 9, 16, 25]", "2"]


def test_listing_class_names_cover_frames_videos_and_containers():
    f = Frame("a", "a.jpg", (Obj("car", (0, 0, 1, 1)), Obj(None, (0, 0, 1, 1), unknown="id 9")), "a.xml", "train")
    frames = Listing("frames", "root", "voc", ["train"], [f])
    assert list(frames.class_names()) == ["car"]
    v1 = Video("v1", "train", "v1.mp4", frames=(f,))
    v2 = Video("v2", "val", "v2.mp4", container=("file", "v2.mp4"), names=("person", "car"))
    clips = Listing("clips", "root", "video", ["train", "val"], [v1, v2])
    assert classes(None, clips) == ["car", "person"]
    assert classes(["bike"], clips) == ["bike"]


def test_sample_key_has_no_dots_slashes_or_spaces():
    assert sample_key("a.b/c\\d e") == "a_b_c_d_e"
