"""How many samples a shard holds, read from its tar headers: :func:`count_samples`.

The training loader cuts each pass over the data by sample counts, so it counts every shard
when it is made (every epoch); the counts are cached per file version.
"""

from __future__ import annotations

import bisect
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
    index = _local_index(url)
    if index is None:
        return sum(1 for sample in _tar_samples(url) for _ in (_raw_samples(sample, kind) if frames else [0]))
    offsets, frames_before = index
    return frames_before[-1] if frames else len(offsets)


def seek_point(url: str, kind: str, skip: int) -> tuple[int, int]:
    """Where to start reading a shard to reach its raw sample ``skip`` (of ``kind``):
    ``(byte offset of a sample's first header, raw samples before that sample)``. A reader that
    starts there skips the bytes of the samples before it instead of reading them; ``(0, 0)``
    where the shard is not a local file."""
    index = _local_index(url) if skip > 0 else None
    if index is None or not index[0]:
        return 0, 0
    offsets, frames_before = index
    if kind != "frames_from_clips":
        k = min(skip, len(offsets) - 1)
        return offsets[k], k
    k = min(bisect.bisect_right(frames_before, skip) - 1, len(offsets) - 1)  # the sample holding frame `skip`
    return offsets[k], frames_before[k]


def _local_index(url: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if not os.path.isfile(url):
        return None
    st = os.stat(url)
    # The file's version: tar pads to 10 KiB records, so a shard rewritten with fewer samples often
    # keeps its size, and `cp -p` or `rsync -t` keep its time; a rewrite changes the inode or ctime.
    return _index_local(url, (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))


@functools.lru_cache(maxsize=4096)
def _index_local(url: str, version: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(byte offset of each sample's first header, numbered clip frames before each sample and,
    last, in all)`` of a local shard, once per file ``version`` (the loader is made every epoch)."""
    offsets: list[int] = []
    frames_before: list[int] = [0]
    key = None
    try:
        with tarfile.open(url, "r:") as tar:
            for info in tar:
                if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != key:
                    key = prefix
                    offsets.append(info.offset)
                    frames_before.append(frames_before[-1])
                frames_before[-1] += _CLIP_FRAME.match((suffix or "").lower()) is not None
    except (tarfile.TarError, EOFError) as e:
        raise _unreadable(url, e) from None
    return tuple(offsets), tuple(frames_before)
