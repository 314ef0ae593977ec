"""Reading a shard directory's ``manifest.json`` (written by the prepare stage).

Every stage that reads shards goes through :func:`read_manifest`, which checks
that the manifest exists and that the shards it lists are on disk, with one-line
errors that name the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stage import StageError


@dataclass(frozen=True)
class Manifest:
    path: Path
    kind: str
    classes: list[str]
    splits: dict[str, dict[str, Any]]
    raw: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.path.parent

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise StageError(f"{self.path}: no split {name!r} (splits: {known})")
        return self.splits[name]

    def shard_paths(self, split: str) -> list[str]:
        """Paths of the split's shards; :class:`StageError` if there are none or one is missing."""
        names = self.split(split).get("shards") or []
        if not names:
            raise StageError(f"{self.path}: split {split!r} has no shards")
        paths = [self.root / n for n in names]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise StageError(f"{missing[0]}: shard listed in {self.path} is missing ({len(missing)} of {len(paths)} missing)")
        return [str(p) for p in paths]

    def count(self, split: str, what: str = "samples") -> int:
        return int(self.split(split).get(what, 0))


def read_manifest(shard_dir: str | Path) -> Manifest:
    """The manifest of a shard directory (``shard_dir/manifest.json``)."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise StageError(f"{path}: no manifest (prepare the dataset first: `dvc repro prepare`, or "
                         "`python -m pipeline.prepare --params <the params file>`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise StageError(f"{path}: malformed manifest (a JSON {type(raw).__name__}, not an object)")
    if raw.get("disabled"):
        raise StageError(f"{path}: this dataset was disabled in the prepare stage")
    try:
        manifest = Manifest(path, raw["kind"], list(raw["classes"]), dict(raw["splits"]), raw)
    except KeyError as e:
        raise StageError(f"{path}: malformed manifest (missing {e})") from None
    except (TypeError, ValueError) as e:
        raise StageError(f"{path}: malformed manifest ({e})") from None
    if not all(isinstance(c, str) for c in manifest.classes) or len(set(manifest.classes)) != len(manifest.classes):
        raise StageError(f"{path}: malformed manifest (classes must be distinct names, got {manifest.classes})")
    return manifest
