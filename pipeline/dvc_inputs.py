"""Under DVC, every file a stage reads must be one of the stage's deps in dvc.yaml.

DVC reruns a stage when one of its listed deps changes, and only then. A key that points the
stage at a file dvc.yaml doesn't list (``dvc exp run -S +train_voc.model.init_weights=mine.pt``,
a model added to ``deploy.models``, a ``--set`` in a stage's command) runs once, and is then
never rerun when that file changes: the versioned outputs would silently come from an older
input. So when a stage runs under DVC (DVC sets ``DVC_STAGE`` and ``DVC_ROOT`` for a stage's
command), :func:`check_tracked` compares the input paths of its configuration (the fields marked
:class:`~pipeline.config.Reads`) with the stage's deps as DVC resolves them, and stops the run
before any work with one line naming the key and the file. Run directly, nothing is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import typing
from typing import Any, Collection, Iterator, Mapping, get_args, get_origin

from pipeline.config import Reads
from pipeline.stage import StageError

log = logging.getLogger("pipeline")


def under_dvc(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs a DVC stage's command (DVC sets ``DVC_STAGE`` for it)."""
    return bool((os.environ if environ is None else environ).get("DVC_STAGE"))


def check_name_follows_model_under_dvc(name: str | None, model: str, section: str,
                                       environ: Mapping[str, str] | None = None) -> None:
    """Under DVC, :class:`~pipeline.stage.StageError` unless ``name`` (the name a stage files its
    results under) is given and is the stem of ``model`` (the file it evaluates or prunes), or
    that stem, ``_`` and more (``lstm_ir_per_frame``). Run directly, ``--set model=`` without
    ``--set name=`` is refused (:func:`pipeline.config.check_name_follows_model`), but ``dvc exp
    run -S section.model=...`` passes no ``--set``: another model's results were filed under the
    section's own name. And a null name (the model file's stem, run directly) is what DVC fills
    into dvc.yaml's outs as ``None``: the stage failed after its work."""
    if not under_dvc(environ):
        return
    stem = os.path.splitext(os.path.basename(model))[0]
    if name is None:
        raise StageError(f"{section}.name: null (the model file's stem) is not for DVC, which fills ${{{section}.name}} "
                         f"into dvc.yaml's outs as 'None'; give the name ({stem!r}, say)")
    if name != stem and not name.startswith(f"{stem}_"):  # ssdlite_voc-pruned is not ssdlite_voc's
        raise StageError(f"{section}.name {name!r} with {section}.model {model}: the results of {model} would be filed "
                         f"as {name!r}; under DVC the name is the model file's stem, or begins with it and '_': set "
                         f"{section}.name too ({stem!r}, say)")


def input_paths(cfg: Any, where: str) -> list[tuple[str, str]]:
    """``(key, path)`` for every :class:`~pipeline.config.Reads` field of the config dataclass
    ``cfg`` and of the configs nested in it (in tuples too), ``key`` under ``where``. A nested
    config with ``enabled: false`` reads nothing; a null path is left out."""
    if getattr(cfg, "enabled", True) is False:
        return []
    found: list[tuple[str, str]] = []
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}.{f.name}"
        if _marked(hints[f.name]):
            if isinstance(value, (tuple, list)):
                found += [(f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, str)]
            elif isinstance(value, str):
                found.append((key, value))
        else:
            for sub_key, sub in _configs(value, key):
                found += input_paths(sub, sub_key)
    return found


def check_tracked(cfg: Any, section: str, *, only: Collection[str] | None = None,
                  unwritten: Mapping[str, str] | None = None, written: Mapping[str, str] | None = None,
                  environ: Mapping[str, str] | None = None) -> None:
    """:class:`~pipeline.stage.StageError` when the stage runs under DVC and one of its input paths
    is neither a dep of the stage nor inside one. ``only``: the top-level keys that this run reads
    (the benchmark's sections); default all. ``unwritten``: files this run won't write, with why
    (``{path: why}``): one the stage lists among its outs is an error too (DVC would fail the
    stage after all its work). ``written``: files this run writes, by the key that places them
    (``{path: key}``): an out of the same file name in another folder is an error too (the key
    moved the file; DVC would not find the out it lists)."""
    environ = os.environ if environ is None else environ
    stage = environ.get("DVC_STAGE")
    if not stage:
        return
    paths = [(k, p) for k, p in input_paths(cfg, section) if only is None or k.split(".")[1].split("[")[0] in only]
    found = _stage_paths(stage, environ.get("DVC_ROOT") or os.getcwd(), [p for _, p in paths])
    if found is None:
        return
    deps, outs, orphans, stale = found
    for path, key in (written or {}).items():
        where = os.path.abspath(path)
        elsewhere = sorted(o for o in outs if os.path.basename(o) == os.path.basename(where) and o != where)
        if elsewhere and where not in outs:
            raise StageError(f"{key}: this run would write {path}, but the DVC stage {stage!r} lists it as "
                             f"{os.path.relpath(elsewhere[0])}: DVC would miss that out and not track this file; keep "
                             f"{key} as dvc.yaml has it, or change the stage's outs")
    for path, why in (unwritten or {}).items():
        if os.path.abspath(path) in outs:
            raise StageError(f"{path}: an out of the DVC stage {stage!r} that this run won't write ({why}); DVC "
                             "would fail the stage after its work: change the setting, or the stage's outs in dvc.yaml")
    for key, path in paths:
        if not _covered(path, deps):
            hint = f" (for example as ${{{key}}})" if "[" not in key else ""
            raise StageError(
                f"{key}: {path} is not among the deps of the DVC stage {stage!r}, so DVC would not rerun the stage "
                f"when it changes; add it to the stage's deps in dvc.yaml{hint}, or run the stage without DVC"
            )
        if path in orphans:
            raise StageError(
                f"{key}: {path} is no DVC stage's output, and neither DVC nor git tracks it (git ignores it): a "
                "file an earlier run left behind (did the key that names it change?), which DVC can neither "
                f"reproduce nor restore; point {key} at a stage's output, or track the file with `dvc add` "
                "(in a folder git doesn't ignore whole, such as weights/, not models/)"
            )
    if stale:
        readers: dict[str, list[str]] = {}
        for other, path in stale:
            names = readers.setdefault(os.path.relpath(path), [])
            if other not in names:
                names.append(other)
        path, names = next(iter(readers.items()))
        more = f" (and {len(readers) - 1} more such file(s))" if len(readers) > 1 else ""
        raise StageError(
            f"{path}, which the DVC stage(s) {', '.join(names)} read, is no stage's output, and neither DVC nor git "
            f"tracks it (git ignores it){more}: a file an earlier run left, most likely before a key that names an "
            "output (a name, a folder) changed. DVC would not rerun those stages, which would go on reading the "
            "old file: point their keys at the new output too, or delete the old file"
        )


def _marked(tp: Any) -> bool:
    """Whether the annotation ``tp`` is, or holds, a :class:`Reads` field."""
    if get_origin(tp) is typing.Annotated and any(isinstance(m, Reads) for m in tp.__metadata__):
        return True
    return any(_marked(a) for a in get_args(tp) if a is not Ellipsis)


def _configs(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """The config dataclasses held by a field's value: itself, or the items of a tuple."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield key, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                yield f"{key}[{i}]", item


def _stage_paths(stage: str, root: str, inputs: list[str]
                 ) -> tuple[list[str], set[str], set[str], list[tuple[str, str]]] | None:
    """The absolute paths of the stage's deps and outs, as DVC resolves them (templates filled
    from the params), the orphans among ``inputs``, and ``(stage, dep)`` for the orphans among the
    other stages' deps; None, with a warning, when DVC can't say.

    An orphan is an existing input that no stage of the project writes, that no ``.dvc`` file
    tracks, and that git ignores: left by an earlier run under another setting (a renamed
    ``prune.name``, a moved ``deploy.out_dir``), it would be read as if the pipeline made it. The
    stage that reads it may not run at all (its deps didn't change), hence the other stages too.
    """
    try:
        from dvc.repo import Repo

        with Repo(root) as repo:
            # One load of dvc.yaml and dvc.lock (ruamel parses a large dvc.lock in about a second):
            # the stage from the index, not from a second `repo.stage.collect`.
            found = [s for s in repo.index.stages if _addresses(stage, s)] or repo.stage.collect(stage)
            deps = [os.path.normpath(str(d.fs_path)) for s in found for d in s.deps]
            outs = {os.path.normpath(str(o.fs_path)) for s in found for o in s.outs}
            orphans: set[str] = set()
            stale: list[tuple[str, str]] = []
            if type(repo.scm).__name__ != "NoSCM":  # without git, nothing is ignored: no orphans
                project_outs = [os.path.normpath(str(o.fs_path)) for o in repo.index.outs]
                orphans = {p for p in inputs if os.path.exists(p) and _orphan(repo, p, project_outs)}
                mine = {s.addressing for s in found}
                others = [(s.addressing, os.path.normpath(str(d.fs_path))) for s in repo.index.stages
                          if s.addressing not in mine for d in s.deps]
                left = {p for p in {p for _, p in others} if os.path.exists(p) and _orphan(repo, p, project_outs)}
                stale = [(name, p) for name, p in others if p in left]
        return deps, outs, orphans, stale
    except Exception as e:  # noqa: BLE001 - any failure of DVC's API only means we can't check
        log.warning("can't read the deps of the DVC stage %r (%s: %s); not checking that DVC tracks this stage's "
                    "input files", stage, type(e).__name__, e)
        return None


def _addresses(address: str, stage: Any) -> bool:
    """Whether DVC's ``address`` of a stage (``name``, or ``path/dvc.yaml:name``) is ``stage``."""
    if address == stage.addressing:
        return True
    file, _, name = address.rpartition(":")
    return bool(file) and name == stage.name and os.path.normpath(file) == os.path.normpath(stage.dvcfile.relpath)


def _orphan(repo: Any, path: str, outs: list[str]) -> bool:
    """Whether ``path`` is neither one of the project's ``outs`` (nor inside one, nor holding one)
    nor tracked by git, while git ignores it."""
    where = os.path.abspath(path)
    if not _covered(where, [os.path.abspath(repo.root_dir)]):
        return False  # outside the project (DVC's external deps): not ours to judge
    roots = _roots(tuple(outs))
    inside = {w.rstrip(os.sep) + os.sep for w in (where, os.path.realpath(where))}
    if _covered(where, outs) or any(r.startswith(w) for r in roots for w in inside):
        return False
    return bool(repo.scm.is_ignored(where)) and not repo.scm.is_tracked(where)


def _covered(path: str, deps: list[str]) -> bool:
    """Whether ``path`` is one of ``deps`` or inside one (as given and with links resolved)."""
    roots = _roots(tuple(deps))
    for candidate in {os.path.abspath(path), os.path.realpath(path)}:
        if candidate in roots or any(candidate.startswith(d.rstrip(os.sep) + os.sep) for d in roots):
            return True
    return False


@functools.lru_cache(maxsize=64)
def _roots(paths: tuple[str, ...]) -> frozenset[str]:
    """``paths`` as given and with links resolved (resolving is most of a check's time: cached)."""
    return frozenset(d for p in paths for d in (p, os.path.realpath(p)))
