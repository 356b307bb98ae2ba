"""Problems found in a dataset, and the one exception type that carries them.

Every problem names the offending file, so a user can fix the data without reading our code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List

from mobilesam_se.errors import UserError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (or folder) of a dataset."""

    path: str
    message: str

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        # Accept Path objects, but store a plain string so problems print and compare simply.
        object.__setattr__(self, "path", str(path))
        object.__setattr__(self, "message", message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DatasetError(UserError):
    """Raised for bad data; `problems` lists every problem found, each naming its file."""

    def __init__(self, problems: Iterable[Problem] | Problem) -> None:
        self.problems: List[Problem] = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: List[Problem], limit: int = 20) -> str:
    """One line per problem (the first `limit`), preceded by a count when there are several."""
    if len(problems) == 1:
        return str(problems[0])
    lines = [f"{len(problems)} problems in the dataset:"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (run `python -m mobilesam_se.data.check` to list all)")
    return "\n".join(lines)
