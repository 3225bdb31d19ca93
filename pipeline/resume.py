"""`--resume`: a resumed run must continue the work it started, never other work under its old name.

A run records what it computes when it starts: its params and `config/<stage>.yaml` (the stage's public
config), and the tags `fewscan.fingerprint`, `fewscan.code_version`, `fewscan.numerics` and its upstream
runs. A resume reopens that run and logs none of this again, so a resume with other settings would end
FINISHED still claiming the first ones, and a later `fewscan run` with the first settings would reuse a
result computed with the others (issue: a run started with 60 outer steps, resumed with the default 30,
claimed 60). Resume therefore refuses unless the fingerprint it would give a new run equals the run's,
and then names every difference it can find (docs/scaling.md, "Resuming a run").

Keys of the stage's `FINGERPRINT_EXCLUDE` (thread counts, report folders) do not change the result: they may
differ, and the log says so (the run's params keep the values it started with).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from typing import Any

from pipeline import tracking
from pipeline.errors import ConfigError
from pipeline.progress import log

_MISSING = object()


def config_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two nested configs; a key
    present on one side only has `_MISSING` on the other. Lists compare whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in list(old) + [k for k in new if k not in old]:
            out += config_changes(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix[:-1], old, new)]


def _show(v: Any) -> str:
    if v is _MISSING:
        return "(not set)"
    return v if isinstance(v, str) else json.dumps(v)


def _set_flag(key: str, v: Any) -> str | None:
    """The `--set` flag (shell-quoted) that gives `key` the value `v` again; None for a key the old run
    did not have (no flag removes a key)."""
    if v is _MISSING:
        return None
    return "--set " + shlex.quote(f"{key}={v if isinstance(v, str) else json.dumps(v)}")


def check_unchanged(
    stage: str,
    run_id: str,
    *,
    config: dict[str, Any],
    fp: str,
    upstream_ids: dict[str, str],
    device: str = "auto",
    exclude: Iterable[str] = (),
) -> None:
    """Refuse to resume `run_id` when `config` (the stage's public config now), the upstream runs, the code
    or the numerics differ from what the run started with (its fingerprint `fp` would differ): a
    `ConfigError` naming each difference (`key: old -> new`) and the fix."""
    tags, logged = tracking.started_with(run_id, stage)
    excluded = set(exclude)
    changed = config_changes(logged, config) if logged is not None else []
    harmless = [c for c in changed if c[0].split(".")[0] in excluded]
    changed = [c for c in changed if c[0].split(".")[0] not in excluded]
    if tags.get(tracking.TAG_FINGERPRINT) == fp:
        for key, old, new in harmless:
            log(
                f"resume: {key} {_show(old)} -> {_show(new)} (does not change the result; its param keeps {_show(old)})"
            )
        return
    what = [f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in changed]
    for name, rid in sorted(upstream_ids.items()):
        was = tags.get(tracking.TAG_UPSTREAM + name)
        if was != rid:
            what.append(f"upstream {name} run: {was or '(none)'} -> {rid}")
    other_code = tags.get(tracking.TAG_CODE) not in (None, tracking.code_version(stage))
    if other_code:
        what.append(
            f"the {stage} code: version {tags.get(tracking.TAG_CODE)} -> {tracking.code_version(stage)}"
        )
    was_numerics = json.loads(tags.get(tracking.TAG_NUMERICS) or "null")
    now_numerics = tracking.numerics(stage, device)
    if was_numerics and now_numerics and was_numerics != now_numerics:
        other_code = True
        what += [
            f"{key}: {_show(old)} -> {_show(new)}"
            for key, old, new in config_changes(was_numerics, now_numerics)
        ]
    if not what:
        what.append(
            "its inputs (the files it reads)"
            if logged is not None
            else f"its settings or inputs (the run has no config/{stage}.yaml to compare)"
        )
    flags = [f for f in (_set_flag(key, old) for key, old, _ in changed) if f]
    if other_code or not changed:
        fix = "start a fresh run without --resume"
    elif flags:
        fix = f"resume with the settings it started with ({' '.join(flags)}), or start a fresh run without --resume"
    else:
        fix = "resume with the settings it started with, or start a fresh run without --resume"
    raise ConfigError(
        f"cannot resume {stage} run {run_id}: it started with other settings than these "
        f"({'; '.join(what)}). A resumed run keeps the params and fingerprint it started with, so it must "
        f"go on computing the same thing: {fix}."
    )
