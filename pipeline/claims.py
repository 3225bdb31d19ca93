"""Computing each stage once when several chains run at once (docs/scaling.md, "Concurrent chains").

`fewscan run` reuses a FINISHED run with the stage's fingerprint. Two chains started together find none,
and both would compute the same stage. Before computing, a chain therefore looks for a live RUNNING run
with the same fingerprint (same experiment and owner rules as reuse; alive = its lease holds,
tracking.lease_gone) and waits for it: reused when it FINISHES, computed here if it fails or dies.

Deciding who computes must hold across processes and machines with nothing but what the tracking store
offers (create a run, set a tag, search), so it is Lamport's bakery algorithm on run tags:

1. create the stage run with `fewscan.claim = choosing` (the run that will compute, if this chain wins);
2. read the other live claims with this fingerprint; take ticket = 1 + the largest ticket seen;
3. poll until no other live claim is still choosing; the claim with the smallest (ticket, run id) wins.
   A live RUNNING run without a claim tag (a single-stage command, a resume) computes whatever happens
   and counts as ticket 0.

A claim created after another chain took its ticket sees that ticket and takes a larger one, so two
chains can never both win; ties (tickets taken at the same time) go to the smaller run id. No clock is
compared, so skewed hosts do not matter. The loser withdraws its run (KILLED with 'superseded by ...' in
`fewscan.error`, then deleted) and waits for the winner. A dead claimant's lease goes, and it stops
counting. Only the run that computed a stage executes it, so a model is registered once per computation.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import tracking
from pipeline.errors import FewscanError
from pipeline.progress import log

TAG_CLAIM = "fewscan.claim"  # "choosing", then the claim's ticket (an integer)
CHOOSING = "choosing"
POLL_S = float(
    os.environ.get("FEWSCAN_WAIT_POLL_S", "5")
)  # a search per poll: cheap, but SQLite has one writer
PROGRESS_S = float(os.environ.get("FEWSCAN_WAIT_PROGRESS_S", "60"))


class WaitTimeout(FewscanError):
    """Another live run kept computing the same stage for longer than the chain was told to wait."""


@dataclass
class Claim:
    """What a chain does for a stage: reuse `reuse_id` (FINISHED, possibly after waiting), or compute in
    `run_id` (created with the stage's tags and won)."""

    run_id: str | None = None
    reuse_id: str | None = None
    waited_for: str | None = None  # the live run this chain waited for, if any
    waited_s: float = 0.0


def _ticket(run: Any) -> int | None:
    """A live run's place in the queue: its ticket, 0 for a run that computes regardless (no claim tag),
    None while it is still choosing."""
    value = run.data.tags.get(TAG_CLAIM)
    if value is None:
        return 0
    if value == CHOOSING:
        return None
    try:
        return int(value)
    except ValueError:
        return 0  # a tag we did not write: treat the run as computing regardless


def _status(run_id: str) -> str:
    try:
        return tracking.run_status(run_id)
    except Exception:  # noqa: BLE001 - only for a log line (a withdrawn claim may be gone)
        return "(state unknown)"


def _holder_line(stage: str, run: Any, waited: float) -> str:
    tags = run.data.tags
    host = tags.get(tracking.TAG_HOST, "?")
    where = "this host" if host == socket.gethostname() else f"host {host}"
    age = time.time() - (run.info.start_time or 0) / 1000
    return (
        f"{stage}: waiting for run {run.info.run_id} (started by pid {tags.get(tracking.TAG_PID, '?')} on "
        f"{where}, {age:.0f} s ago) computing the same {stage}; waited {waited:.0f} s so far"
    )


def acquire(
    stage: str,
    fp: str,
    *,
    suite: str | None,
    dataset: str | None,
    create: Callable[[], str],
    timeout_s: float | None = None,
) -> Claim:
    """Reuse a FINISHED run with fingerprint `fp`, wait for a live one computing it, or win the claim.

    `create` makes the stage run (RUNNING, with the stage's tags and `fewscan.claim = choosing`) and
    returns its id. `timeout_s`: how long to wait for another run before giving up (None: as long as
    that run is alive); WaitTimeout says which run and what to do."""
    t0 = time.monotonic()
    last_line = -float("inf")
    waited_for: str | None = None

    def waited() -> float:
        return time.monotonic() - t0

    while True:
        # the live runs first, then the finished ones: a run that finishes between the two reads is then
        # seen finished, never missed (and mistaken for one that died)
        live = tracking.running_with_fingerprint(stage, fp, suite=suite, dataset=dataset)
        rid = tracking.find_reusable(stage, fp, suite=suite, dataset=dataset)
        if rid:
            return Claim(reuse_id=rid, waited_for=waited_for, waited_s=waited())
        if not live:
            if waited_for:
                log(
                    f"{stage}: run {waited_for} ended {_status(waited_for)} without finishing; computing {stage} here"
                )
            mine = create()
            try:
                winner = _contend(stage, fp, mine, suite=suite, dataset=dataset)
            except BaseException as err:  # Ctrl-C or a store error while claiming: leave no claim behind
                with contextlib.suppress(Exception):
                    tracking.withdraw_run(
                        mine, f"stopped while claiming the {stage}: {type(err).__name__}: {err}"
                    )
                raise
            if winner is None:
                return Claim(run_id=mine, waited_for=waited_for, waited_s=waited())
            tracking.withdraw_run(
                mine,
                f"superseded by run {winner}, which computes the same {stage} (same fingerprint); this "
                "chain waits for it and reuses it",
            )
            waited_for = winner
            continue  # wait for the winner (or reuse it, if it finished meanwhile)
        holder = min(live, key=lambda r: (_ticket(r) is None, _ticket(r) or 0, r.info.run_id))
        waited_for = str(holder.info.run_id)
        if timeout_s is not None and waited() >= timeout_s:
            raise WaitTimeout(
                f"{stage}: run {holder.info.run_id} is still computing the same {stage} after {waited():.0f} s "
                f"of waiting (--wait-timeout {timeout_s:g}). Run the chain again later to reuse it, or pass "
                "--force to compute a copy of your own."
            )
        if time.monotonic() - last_line >= PROGRESS_S:
            log(_holder_line(stage, holder, waited()))
            last_line = time.monotonic()
        time.sleep(POLL_S if timeout_s is None else max(0.0, min(POLL_S, timeout_s - waited())))


def _contend(stage: str, fp: str, mine: str, *, suite: str | None, dataset: str | None) -> str | None:
    """Take a ticket for claim `mine` and wait out the other claims still choosing; None if `mine`
    computes, else the id of the run that does (a live claim ahead of it, or a run that finished)."""
    seen = tracking.running_with_fingerprint(stage, fp, suite=suite, dataset=dataset)
    ticket = 1 + max([t for r in seen if (t := _ticket(r)) is not None], default=0)
    tracking.set_run_tag(mine, TAG_CLAIM, str(ticket))
    while True:
        running = tracking.running_with_fingerprint(stage, fp, suite=suite, dataset=dataset)
        done = tracking.find_reusable(stage, fp, suite=suite, dataset=dataset)  # after: see `acquire`
        if done:
            return done
        queue: list[tuple[int, str]] = []
        choosing = False
        for run in running:
            t = _ticket(run)
            if run.info.run_id == mine:
                continue
            if t is None:
                choosing = True
            else:
                queue.append((t, str(run.info.run_id)))
        if choosing:
            time.sleep(min(POLL_S, 0.2))  # choosing takes one search and one tag: moments
            continue
        first = min(queue, default=None)
        return first[1] if first is not None and first < (ticket, mine) else None
