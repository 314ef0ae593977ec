"""Shard saver and reader: WebDataset tar shards named ``{split}-{index:06d}.tar``.

:class:`ShardWriter` is the library's saver for samples: it fills shards up to
a maximum number of samples and bytes, writes every tar with webdataset's
``TarWriter`` and a fixed mtime (the same samples give byte-identical tars,
which keeps DVC hashes stable), and writes each tar under a hidden temporary
name that it renames to the final name only once the tar is complete and
synced. A process killed midway leaves at most a ``.tmp-*`` file, never a
file that looks like a shard.

:func:`list_shards`, :func:`iter_samples` and :func:`read_manifest` read a
shard directory back (tests, inspection, loaders).

A sample is a key plus members: ``{"jpg": bytes, "json": bytes}`` is stored as
``<key>.jpg`` and ``<key>.json``. Keys may not contain ``.`` or ``/``:
WebDataset splits a member name at its FIRST dot, so a dotted key would
silently merge or split samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)-(?P<index>\d{6})\.tar$")
"""A complete shard's file name."""

TMP_PREFIX = ".tmp-"
FIXED_MTIME = 0.0
"""mtime of every tar member: fixed so that tars are byte-identical run to run."""

_TAR_BLOCK = 512
_KEY_OK = re.compile(r"^[^./\s][^./]*$")
_MEMBER_OK = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class ShardWriter:
    """Write samples of one split into ``directory/{split}-{index:06d}.tar``.

    A new shard starts when the current one holds ``max_samples`` samples or
    when the next sample would take it past ``max_bytes`` (tar headers and
    padding included; a single larger sample still gets a shard of its own).
    Use as a context manager: on a clean exit the last shard is completed, on
    an exception the unfinished shard's temporary file is removed and no
    final name is created for it.

    >>> with ShardWriter(out_dir, "train", max_samples=100) as w:   # doctest: +SKIP
    ...     w.write("img_0001", {"jpg": jpeg_bytes, "json": b"{}"})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str,
        max_samples: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
        mtime: float = FIXED_MTIME,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-'")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"max_samples and max_bytes must be >= 1, got {max_samples}, {max_bytes}")
        self.directory = Path(directory)
        self.split = split
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.mtime = mtime
        self.shards: list[str] = []  # complete shards, in order
        self.sha256: dict[str, str] = {}  # complete shard -> SHA-256 of its bytes (hex)
        self.samples = 0  # samples written in total
        self._keys: set[str] = set()
        self._file = None
        self._tar = None
        self._tmp: str | None = None
        self._count = 0
        self._bytes = 0

    def write(self, key: str, members: Mapping[str, bytes]) -> str:
        """Add one sample; returns the name of the shard it went into.

        Raises ValueError for a key with ``.``/``/`` (or empty), a repeated
        key, an empty sample, or a member name that is not ``ext`` or
        ``part.ext`` made of letters, digits, ``_`` and ``-``.
        """
        if not _KEY_OK.match(key):
            raise ValueError(f"sample key {key!r} is empty or contains '.' or '/'")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        for name, data in members.items():
            if not _MEMBER_OK.match(name) or name.startswith("_"):
                raise ValueError(f"sample {key!r}: bad member name {name!r}")
            if not isinstance(data, (bytes, bytearray)):
                raise ValueError(f"sample {key!r}: member {name!r} is {type(data).__name__}, not bytes")
        size = sum(_TAR_BLOCK + -(-len(d) // _TAR_BLOCK) * _TAR_BLOCK for d in members.values())
        if self._tar is not None and (
            self._count >= self.max_samples or self._bytes + size > self.max_bytes
        ):
            self._finish()
        if self._tar is None:
            self._start()
        sample = {"__key__": key}
        sample.update({name: bytes(data) for name, data in members.items()})
        self._tar.write(sample)
        self._keys.add(key)
        self._count += 1
        self._bytes += size
        self.samples += 1
        return self._name(len(self.shards))

    def close(self) -> list[str]:
        """Complete the current shard; returns the names of all shards written."""
        if self._tar is not None:
            self._finish()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary file); complete shards stay."""
        if self._tar is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
            self._tar = None
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def _start(self) -> None:
        # Imported here: webdataset pulls in torch, which only writers need.
        from webdataset.writer import TarWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        name = self._name(len(self.shards))
        fd, self._tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}.", dir=self.directory)
        self._file = os.fdopen(fd, "wb")
        self._tar = TarWriter(self._file, encoder=False, mtime=self.mtime, user="ssd", group="ssd")
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        name = self._name(len(self.shards))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes it private (0600)
        with open(self._tmp, "rb") as f:  # read back from the page cache: about 1 GB/s
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        os.replace(self._tmp, self.directory / name)
        self.shards.append(name)
        self.sha256[name] = digest.hexdigest()
        self._tar = self._file = self._tmp = None


def list_shards(directory: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Complete shards in ``directory`` (optionally of one split), sorted by split then index.

    Temporary files of unfinished shards are never listed.
    """
    out = []
    for path in Path(directory).iterdir():
        m = SHARD_NAME.match(path.name)
        if m and path.is_file() and (split is None or m.group("split") == split):
            out.append((m.group("split"), int(m.group("index")), path))
    return [p for _, _, p in sorted(out)]


def iter_samples(shards: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[dict]:
    """Yield the samples of shards (a shard directory, one tar, or a list of tars), in order.

    Each sample is ``{"__key__": key, "__shard__": tar name, member name: bytes, ...}``,
    the member name being everything after the key's first dot (``"jpg"``,
    ``"000.jpg"``), exactly as WebDataset splits it.
    """
    if isinstance(shards, (str, os.PathLike)):
        path = Path(shards)
        paths = list_shards(path) if path.is_dir() else [path]
    else:
        paths = [Path(p) for p in shards]
    for path in paths:
        with tarfile.open(path, "r") as tar:
            sample: dict | None = None
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                prefix = info.name[: len(info.name) - len(base)]
                key, _, member = base.partition(".")
                key = prefix + key
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__shard__": path.name}
                sample[member] = tar.extractfile(info).read()
            if sample is not None:
                yield sample


def read_manifest(directory: str | os.PathLike) -> dict:
    """The ``manifest.json`` of a shard directory."""
    return json.loads((Path(directory) / "manifest.json").read_text())
