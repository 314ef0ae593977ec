"""Value bounds declared on config dataclass fields, as ``typing.Annotated`` metadata.

A config field says what values make sense where it is declared::

    batch_size: PositiveInt = 16                       # Annotated[int, AtLeast(1)]
    classes: Annotated[tuple[str, ...], NonEmpty(), Unique()] | None = None

The code that builds configs from user input (``pipeline.config``) checks every bound and
reports ``<key>: <problem>``; the library itself only declares them. Cross-field rules stay in
the dataclasses' ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Sequence


def _shown(x: float) -> str:
    """A bound as written: whole numbers in full (2**32 is 4294967296, not 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class AtLeast:
    """``value >= low``."""

    low: float

    def problem(self, value: Any) -> str | None:
        return None if value >= self.low else f"must be at least {_shown(self.low)}"


@dataclass(frozen=True)
class Above:
    """``value > low``."""

    low: float

    def problem(self, value: Any) -> str | None:
        return None if value > self.low else f"must be greater than {_shown(self.low)}"


@dataclass(frozen=True)
class Below:
    """``value < high``."""

    high: float

    def problem(self, value: Any) -> str | None:
        return None if value < self.high else f"must be less than {_shown(self.high)}"


@dataclass(frozen=True)
class AtMost:
    """``value <= high``."""

    high: float

    def problem(self, value: Any) -> str | None:
        return None if value <= self.high else f"must be at most {_shown(self.high)}"


@dataclass(frozen=True)
class Between:
    """``low <= value <= high``."""

    low: float
    high: float

    def problem(self, value: Any) -> str | None:
        return None if self.low <= value <= self.high else f"must be in [{_shown(self.low)}, {_shown(self.high)}]"


@dataclass(frozen=True)
class NonEmpty:
    """A list or string with at least one item."""

    def problem(self, value: Sequence) -> str | None:
        return None if len(value) else "must not be empty"


@dataclass(frozen=True)
class Unique:
    """A list whose items are all different."""

    def problem(self, value: Sequence) -> str | None:
        seen = set()
        for item in value:
            if item in seen:
                return f"{item!r} is listed twice"
            seen.add(item)
        return None


@dataclass(frozen=True)
class Inside:
    """A path read from under a folder (a dataset's root) that stays there: relative, without
    ``..``. (DVC tracks the root: a file outside it would be read but never tracked.)"""

    def problem(self, value: str) -> str | None:
        path = PurePath(value)
        if path.is_absolute() or value.startswith("~") or ".." in path.parts:
            return "must be a path inside the dataset's root (relative, without '..')"
        return None


@dataclass(frozen=True)
class SplitTemplate:
    """A string whose only placeholder is ``{split}`` (replaced by each split's name)."""

    def problem(self, value: str) -> str | None:
        try:
            value.format(split="x")
        except (KeyError, IndexError, ValueError):
            return "may hold one placeholder, {split}, and no other braces"
        return None


PositiveInt = Annotated[int, AtLeast(1)]
"""1, 2, ...: sizes and counts of things that must exist."""
Count = Annotated[int, AtLeast(0)]
"""0, 1, ...: counts where none is allowed."""
Seed = Annotated[int, AtLeast(0), Below(2**32)]
"""A random seed: numpy's (and so Accelerate's ``set_seed``) are 0 .. 2**32 - 1."""
PositiveFloat = Annotated[float, Above(0)]
Fraction = Annotated[float, Between(0, 1)]
"""A probability or a share, in [0, 1]."""
Names = Annotated[tuple[str, ...], NonEmpty(), Unique()]
"""Class or split names: at least one, none twice."""
SubPath = Annotated[str, NonEmpty(), Inside()]
"""A file or folder under a dataset's root."""
SplitPath = Annotated[str, NonEmpty(), Inside(), SplitTemplate()]
"""A file or folder under a dataset's root, ``{split}`` replaced by each split's name."""
