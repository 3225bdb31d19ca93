"""Progress output for long steps: a tqdm bar on a terminal, periodic plain lines otherwise (CI logs).

Everything goes to stderr so that stdout stays clean for machine-readable output (e.g. `predict`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[fewscan] {msg}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def eta_text(n: int, total: int | None, elapsed: float) -> str:
    """', 1m05s elapsed, ETA 0m40s' for a plain progress line (no ETA before the first item or without a total)."""
    out = f", {_clock(elapsed)} elapsed"
    if total and 0 < n < total:
        out += f", ETA {_clock(elapsed / n * (total - n))}"
    return out


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", every_s: float = 10.0
) -> Iterator[T]:
    """Iterate with a progress bar (TTY) or a line every `every_s` seconds (no TTY)."""
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        return
    t0 = last = time.monotonic()
    n = 0
    for item in iterable:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= every_s:
            rate = n / max(now - t0, 1e-9)
            of = f"/{total}" if total else ""
            log(f"{desc}: {n}{of} ({rate:.1f}/s{eta_text(n, total, now - t0)})")
            last = now


class Bar:
    """A manually-updated bar with postfix values (loss, acc, tasks/s) for training loops.

    `total` is an upper bound when the loop can stop early (early stopping): the ETA is then a bound too.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, every_s: float = 10.0):
        self.tty = sys.stderr.isatty()
        self.total, self.desc, self.n, self.initial = total, desc, initial, initial
        self.every_s = every_s
        self.t0 = self.last = time.monotonic()
        self.bar = (
            tqdm(total=total, desc=desc, initial=initial, file=sys.stderr, dynamic_ncols=True)
            if self.tty
            else None
        )

    def update(self, n: int = 1, **postfix: float | str) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            vals = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items()
            )
            # a resumed loop's rate counts only the steps of this process
            eta = eta_text(self.n - self.initial, self.total - self.initial, now - self.t0)
            log(f"{self.desc}: {self.n}/{self.total}{' ' + vals if vals else ''}{eta}")
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
