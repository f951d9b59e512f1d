"""The privacy-level grammar: `none`, `eps<target epsilon>`, `sigma<noise multiplier>`.

The one parser for every place that reads a level: the config check, Snakemake's `{level}`
wildcard, calibration, the summary's row order, the figures' order and the report's labels.
Equivalent spellings are one level (eps8, eps8.0 and eps08 are Level("eps", 8.0)); its
canonical name ("eps8": no leading zeros, no trailing fractional zeros) is what directory names,
the summary's `level` column and the figures use.

Pure Python, no dependencies: importable in every environment (dpscale.privacy is not: it pulls
in dp-accounting).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

#: The kinds in their order: non-private first, then target epsilons, then noise multipliers.
KINDS = ("none", "eps", "sigma")
EXPECTED = "none, eps<number> (e.g. eps8) or sigma<number> (e.g. sigma1.1)"
_SYNTAX = re.compile(r"^(?:none|(?P<kind>eps|sigma)(?P<number>[0-9]+(?:\.[0-9]+)?))$")
_CANONICAL_NUMBER = r"(?:0|[1-9][0-9]*)(?:\.[0-9]*[1-9])?"
#: Canonical names only, for Snakemake's {level}: a path spelled eps8.0 matches no rule.
WILDCARD = rf"none|eps{_CANONICAL_NUMBER}|sigma{_CANONICAL_NUMBER}"


class LevelError(ValueError):
    """Text that is not a privacy level, or a level that cannot be trained."""


@dataclass(frozen=True)
class Level:
    kind: str  # one of KINDS
    value: float | None = None  # the target epsilon or the noise multiplier; None for none

    @property
    def private(self) -> bool:
        return self.kind != "none"

    @property
    def target_epsilon(self) -> float | None:
        return self.value if self.kind == "eps" else None

    @property
    def noise_multiplier(self) -> float | None:
        return self.value if self.kind == "sigma" else None

    @property
    def name(self) -> str:
        """The canonical spelling: eps8.0 and eps08 are 'eps8', sigma1.10 is 'sigma1.1'."""
        return "none" if self.value is None else f"{self.kind}{_plain(self.value)}"

    def sort_key(self) -> tuple:
        """none, then eps by target (eps2 before eps10), then sigma by multiplier."""
        return (KINDS.index(self.kind), self.value or 0.0, "")

    def text(self) -> str:
        """What the level means before it is run: the report's `epsilon` label."""
        if self.kind == "none":
            return "∞ (non-private)"
        if self.kind == "eps":
            return f"≤ {_plain(self.value)} (target)"
        return f"sigma {_plain(self.value)} (calibrated: see summary)"

    def __str__(self) -> str:
        return self.name


NONE = Level("none")


def _plain(value: float) -> str:
    """The shortest decimal that reads back as `value`, never in exponent notation."""
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse(text: str | Level) -> Level:
    """The level a spelling names; LevelError (one line, the text and what was expected)."""
    if isinstance(text, Level):
        return text
    match = _SYNTAX.match(text) if isinstance(text, str) else None
    if match is None:
        raise LevelError(f"{text!r} is not a privacy level; expected {EXPECTED}")
    if match["kind"] is None:
        return NONE
    kind, value = match["kind"], float(match["number"])
    if not math.isfinite(value):
        raise LevelError(f"{text!r}: the number is too large; expected a finite {kind}")
    if value == 0 and kind == "sigma":
        raise LevelError(
            f"{text!r} adds no noise; expected sigma > 0, or the level none for non-private "
            "training"
        )
    if value == 0:
        raise LevelError(
            f"{text!r} is unreachable (epsilon 0 needs infinite noise); expected a target "
            "epsilon > 0, or the level none for non-private training"
        )
    return Level(kind, value)


def canonical(text: str | Level) -> str:
    return parse(text).name


def order_key(text) -> tuple:
    """Level.sort_key of a spelling; anything else (a missing cell) after every level, by text,
    so a table with a stray value still sorts."""
    try:
        return parse(text).sort_key()
    except LevelError:
        return (len(KINDS), 0.0, str(text))


def ordered(levels: Iterable[str | Level]) -> list[str]:
    """The distinct levels' canonical names in the one order (see Level.sort_key)."""
    return [lv.name for lv in sorted({parse(x) for x in levels}, key=Level.sort_key)]


def text(level: str | Level) -> str:
    return parse(level).text()


def distinct(levels: Iterable[str]) -> list[str]:
    """The canonical names of a list that must not name one level twice (in its order)."""
    seen: dict[Level, str] = {}
    for spelling in levels:
        level = parse(spelling)
        if level in seen:
            first = seen[level]
            raise LevelError(
                f"{first!r} is listed twice; expected each level once"
                if first == spelling
                else f"{first!r} and {spelling!r} are the same level; expected each level once"
            )
        seen[level] = spelling
    return [lv.name for lv in seen]
