"""The source files each DVC stage runs, computed from its imports, so that dvc.yaml can't drift.

Usage::

    python -m pipeline.stage_deps            # each stage's code deps, as dvc.yaml should list them
    python -m pipeline.stage_deps --check    # exit 1, naming the differences, if dvc.yaml lists others
    python -m pipeline.stage_deps --write    # rewrite the code deps in dvc.yaml (other lines stay as they are)

A stage depends on the project modules its command imports, directly or through other
project modules, at the top of a file or inside a function (found by reading the source,
so imports a run only reaches on some paths count too), plus the package ``__init__``
files Python runs on the way, plus the Accelerate configuration ``pipeline.launch`` reads.
A comment in a module the stage never imports then reruns nothing.
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
#: The top-level packages of the project; imports of anything else are third-party.
PACKAGES = ("pipeline", "ssd")
#: Files that a module reads at run time, besides its imports.
DATA_FILES = {"pipeline.launch": ["configs/accelerate/default.yaml"]}
#: Deps in dvc.yaml that are code: these are what the check compares.
CODE_PREFIXES = tuple(f"{p}/" for p in PACKAGES) + ("configs/accelerate/",)


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of project module ``name`` (a package: its ``__init__.py``), or None if there is none."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name ``path`` imports, wherever in the file (``from a import b``: ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` steps up
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(p for p in [*parts, base] if p)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def module_closure(modules: Iterable[str], root: Path = ROOT) -> set[Path]:
    """The files of ``modules`` and of every project module they import, transitively."""
    todo, seen, files = list(modules), set(), set()
    while todo:
        name = todo.pop()
        for parent in _with_parents(name):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            if parent in seen:
                continue
            seen.add(parent)
            path = module_file(parent, root)
            if path is None:
                continue
            files.add(path)
            todo.extend(_imported_names(path, parent))
    return files


def stage_modules(cmd: str) -> list[str]:
    """The project modules a stage command runs: ``python -m X ...``, and for ``pipeline.launch`` the stage."""
    words = shlex.split(cmd)
    if "-m" not in words:
        return []
    i = words.index("-m")
    module, rest = words[i + 1], words[i + 2 :]
    stage = next((w for w in rest if not w.startswith("-")), None)
    return [module, f"pipeline.{stage}"] if module == "pipeline.launch" and stage else [module]


def code_deps(cmd: str, root: Path = ROOT) -> list[str]:
    """What dvc.yaml should list as the code deps of a stage that runs ``cmd`` (paths from ``root``)."""
    modules = stage_modules(cmd)
    files = {str(p.relative_to(root)) for p in module_closure(modules, root)}
    for module in modules:
        files.update(DATA_FILES.get(module, []))
    return sorted(files)


def check(dvc_yaml: dict[str, Any], root: Path = ROOT) -> list[str]:
    """``"<stage>: missing/extra <file>"`` for every code dep dvc.yaml has wrong."""
    problems = []
    for name, stage in dvc_yaml.get("stages", {}).items():
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith(CODE_PREFIXES)}
        wanted = set(code_deps(stage["cmd"], root))
        problems += [f"{name}: missing {f}" for f in sorted(wanted - listed)]
        problems += [f"{name}: not imported, but listed: {f}" for f in sorted(listed - wanted)]
    return problems


def rewrite(text: str) -> str:
    """``text`` (dvc.yaml) with each stage's code deps replaced by :func:`code_deps`, after its other deps."""
    import yaml

    stages = yaml.safe_load(text)["stages"]
    out: list[str] = []
    stage = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        out.append(line)
        i += 1
        if stage in stages and line == "    deps:":
            block = []
            while i < len(lines) and (lines[i].startswith("      ") or not lines[i].strip()):
                block.append(lines[i])
                i += 1
            kept = [b for b in block if not b.strip().removeprefix("- ").startswith(CODE_PREFIXES)]
            out += kept + [f"      - {f}" for f in code_deps(stages[stage]["cmd"])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description="Code deps of the DVC stages, from their imports.")
    parser.add_argument("--dvc-yaml", default=str(ROOT / "dvc.yaml"))
    parser.add_argument("--check", action="store_true", help="compare with dvc.yaml; exit 1 on a difference")
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    args = parser.parse_args(argv)
    if args.write:
        from ssd import atomic

        path = Path(args.dvc_yaml)
        atomic.write_text(path, rewrite(path.read_text()))
        return 0
    stages = yaml.safe_load(Path(args.dvc_yaml).read_text())
    if args.check:
        problems = check(stages)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    for name, stage in stages["stages"].items():
        print(f"{name}:")
        for f in code_deps(stage["cmd"]):
            print(f"  - {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
