"""What the deploy test checked: named steps with their time and outcome, printed as they end and
as a summary at the end (closing with the plain ``deploy: N passed, M failed`` line)."""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["CheckFailed", "Report", "Skipped"]


class CheckFailed(AssertionError):
    """A check of the deploy test did not hold; the message says what was seen."""


class Skipped(Exception):
    """A step failed: the rest of its phase is not run."""


@dataclass
class Step:
    """One named step."""

    name: str
    seconds: float
    outcome: str  # PASS, FAIL, SKIP
    detail: str = ""


@dataclass
class Report:
    """Collects steps; a failed step is recorded and lets the run go on to its teardown."""

    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        """A progress line, stamped with the run's elapsed time."""
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Run a step; append notes to the yielded list (shown after its name). A failure is
        recorded and ends the enclosing :meth:`phase` (its later steps depend on this one)."""
        notes: list[str] = []
        start = time.monotonic()
        try:
            yield notes
        except Skipped:
            raise
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            self.steps.append(Step(name, time.monotonic() - start, "FAIL", detail))
            self.say(f"FAIL {name} ({time.monotonic() - start:.1f} s): {detail}")
            if not isinstance(exc, CheckFailed):
                traceback.print_exc(file=sys.stdout)
            raise Skipped(name) from exc
        seconds = time.monotonic() - start
        self.steps.append(Step(name, seconds, "PASS", "; ".join(notes)))
        self.say(f"PASS {name} ({seconds:.1f} s){': ' + '; '.join(notes) if notes else ''}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A group of steps: the first failed one ends the group (the rest are not run)."""
        self.say(f"== {name}")
        try:
            yield
        except Skipped as exc:
            self.say(f"{name}: stopped after {exc}")

    @property
    def failed(self) -> list[Step]:
        """The failed steps."""
        return [s for s in self.steps if s.outcome == "FAIL"]

    def summary(self) -> str:
        """The table of steps and the closing count line."""
        lines = [f"deploy test summary ({self.elapsed():.0f} s in all)"]
        for s in self.steps:
            detail = f"  {s.detail}" if s.detail else ""
            lines.append(f"  {s.outcome:4}  {s.seconds:6.1f} s  {s.name}{detail}")
        passed = sum(s.outcome == "PASS" for s in self.steps)
        skipped = sum(s.outcome == "SKIP" for s in self.steps)
        closing = f"deploy: {passed} passed, {len(self.failed)} failed"
        lines.append(closing + (f", {skipped} skipped" if skipped else ""))
        return "\n".join(lines)
