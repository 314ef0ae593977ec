"""How many samples a shard holds, read from its tar headers: :func:`count_samples`.

The training loader cuts each pass over the data by sample counts, so it counts every shard
when it is made (every epoch); the counts are cached per file version.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile

from webdataset.tariterators import base_plus_ext

from ssd.data.samples import _CLIP_FRAME, _raw_samples, _tar_samples, _unreadable


def count_samples(url: str, kind: str = "frames") -> int:
    """The number of raw samples of ``kind`` in one shard, as :func:`_tar_samples` and
    :func:`_raw_samples` yield them: WebDataset samples, or for ``frames_from_clips`` the clips'
    frames (their numbered image members).

    A local file is counted from its tar headers alone (files are seeked over, not read), as
    WebDataset groups them: consecutive regular files whose names share the part before the
    first dot of their base name, ``__...__`` metadata skipped. Anything else is read through.
    """
    frames = kind == "frames_from_clips"
    if not os.path.isfile(url):
        return sum(1 for sample in _tar_samples(url) for _ in (_raw_samples(sample, kind) if frames else [0]))
    st = os.stat(url)
    # The file's version: tar pads to 10 KiB records, so a shard rewritten with fewer samples often
    # keeps its size, and `cp -p` or `rsync -t` keep its time; a rewrite changes the inode or ctime.
    counts = _count_local(url, (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    return counts[1] if frames else counts[0]


@functools.lru_cache(maxsize=4096)
def _count_local(url: str, version: tuple[int, ...]) -> tuple[int, int]:
    """``(samples, numbered clip frames)`` of a local shard, once per file ``version`` (the loader
    is made every epoch)."""
    count, frames, key = 0, 0, None
    try:
        with tarfile.open(url, "r:") as tar:
            for info in tar:
                if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is not None and prefix != key:
                    count, key = count + 1, prefix
                frames += prefix is not None and _CLIP_FRAME.match((suffix or "").lower()) is not None
    except (tarfile.TarError, EOFError) as e:
        raise _unreadable(url, e) from None
    return count, frames
