"""Progress bars whose time estimates hold.

An encoder's work grows with the tokens it reads, not with the prompts it has done: batches run longest prompt
first, so a bar counting prompts extrapolates the slowest prompts to the whole run (7 hours shown for 47 real
minutes). `TokenBar` counts tokens and shows prompts done beside them.

Training fits many small networks of different sizes (the ensemble on every training row, then the same
ensemble again on each cross-fitting fold's rows): `WorkBar` counts the rows each fit trains on, so its
estimate weighs a fold's smaller fits for what they cost. It prints the plan, a line per step and, once the
first fit has been timed, how long the whole job will take on this machine.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm


class TokenBar:
    """A tqdm bar over `total_tokens`; `advance(tokens, prompts)` after each batch."""

    def __init__(self, total_tokens: int, prompts: int, *, desc: str, disable: bool = False):
        self.prompts, self.done = prompts, 0
        self.bar = tqdm(total=int(total_tokens), desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                        disable=disable)
        self._show()

    def advance(self, tokens: int, prompts: int) -> None:
        self.done += prompts
        self._show(refresh=False)
        self.bar.update(int(tokens))

    def _show(self, refresh: bool = True) -> None:
        self.bar.set_postfix_str(f"{self.done:,}/{self.prompts:,} prompts", refresh=refresh)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Step:
    """One step of a job: a name for the code, what the user reads, and its work (the training rows of all its
    fits together; 0 for a step that fits no network)."""

    key: str
    what: str
    work: int


class WorkBar:
    """One bar over every network fit of a job, counted in training rows (see the module docstring).

    `step(key)` starts a step with a line; `fitted(rows, seconds)` after each fit advances the bar, and the
    second one prints how long the rest will take, from that fit's measured time. Not the first: it carries
    one-off start-up costs (torch's first optimizer alone takes seconds to import).
    """

    def __init__(self, steps: Sequence[Step], *, title: str, disable: bool = False):
        self.steps, self.disable = list(steps), disable
        self.total = sum(s.work for s in self.steps)
        self.fits = self.done = 0
        self._line(f"{title}: " + "; ".join(f"{i + 1}. {s.what}" for i, s in enumerate(self.steps)))
        self.bar = tqdm(total=self.total, desc="training", unit="row", unit_scale=True, dynamic_ncols=True,
                        disable=disable or not self.total)

    def _line(self, text: str) -> None:
        if not self.disable:
            tqdm.write(text, file=sys.stderr)

    def step(self, key: str) -> None:
        index = next(i for i, s in enumerate(self.steps) if s.key == key)
        text = f"step {index + 1}/{len(self.steps)}: {self.steps[index].what}"
        self._line(text)
        self.bar.set_postfix_str(text)

    def fitted(self, rows: int, seconds: float) -> None:
        self.bar.update(rows)
        self.fits, self.done = self.fits + 1, self.done + rows
        left = self.total - self.done
        if self.fits == 2 and rows and left > 0:
            self._line(f"estimate: about {_duration(seconds * left / rows)} to go on this machine (measured on one "
                       f"fit: {rows:,} rows in {seconds:.1f} s)")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
