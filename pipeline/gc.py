"""`fewscan gc`: list (a dry run, by default) or remove what only takes disk space: the artifacts of runs
nothing needs any more (older `--force` reruns, FAILED/KILLED runs; which ones: `pipeline/gc_runs.py`,
docs/storage.md) and, on request, the least recently used entries of ingest's decode cache
(`pipeline/ingest/cache_prune.py`). Reports the bytes it would free, or freed.

The flags and the suite are checked before mlflow is imported: a typo is reported at once.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError


def human(n: int) -> str:
    """1536 -> '1.5 KB' (binary units, as `du -h`)."""
    units = ("B", "KB", "MB", "GB", "TB")
    x, i = float(n), 0
    while x >= 1024 and i < len(units) - 1:
        x, i = x / 1024, i + 1
    return f"{n} B" if i == 0 else f"{x:.1f} {units[i]}"


# ----------------------------------------------------------------------------------------- command
def _suite_cache_dir(suite_ref: str) -> tuple[str, Path | None]:
    """(suite name, the decode cache its data manifest uses: `cache_dir`, None when disabled)."""
    from pipeline.config import read_yaml
    from pipeline.suite import load_suite

    suite = load_suite(suite_ref)
    raw = read_yaml(suite.manifest_path)
    if "cache_dir" in raw:
        return suite.name, Path(raw["cache_dir"]) if raw["cache_dir"] is not None else None
    return suite.name, _default_cache_dir()


def _default_cache_dir() -> Path:
    from pipeline.ingest.manifest import IngestConfig

    return Path(IngestConfig.model_fields["cache_dir"].default)


def run(
    suite_ref: str | None,
    *,
    delete_now: bool,
    cache_dir: Path | None,
    cache_max_bytes: str | None,
    cache_max_age_days: float | None,
) -> tuple[int, int]:
    """`fewscan gc`: print what goes (and, with `delete_now`, remove it); (bytes planned, bytes freed)."""
    from pipeline.ingest import cache_prune

    # the flags first: a typo must not cost a scan of the store
    max_bytes = cache_prune.parse_size(cache_max_bytes) if cache_max_bytes is not None else None
    if cache_max_age_days is not None and not cache_max_age_days >= 0:
        raise ConfigError(f"--cache-max-age must be a number of days >= 0, got {cache_max_age_days}")
    suite_name = None
    if suite_ref is not None:
        suite_name, suite_cache = _suite_cache_dir(suite_ref)
        cache_dir = cache_dir if cache_dir is not None else suite_cache
    elif cache_dir is None:
        cache_dir = _default_cache_dir()

    from pipeline import gc_runs  # mlflow

    p = gc_runs.plan(suite_name)
    print("\n".join(gc_runs.plan_lines(p)), flush=True)
    run_bytes_planned = p.nbytes + sum(gc_runs.run_bytes(r) for r in p.leftovers)

    found = cache_prune.entries(cache_dir) if cache_dir is not None else []
    pruning = max_bytes is not None or cache_max_age_days is not None
    drop = cache_prune.select(found, max_bytes, cache_max_age_days) if pruning else []
    if cache_dir is None:
        print("decode cache: disabled by the suite's data manifest (cache_dir: null)", flush=True)
    else:
        total = sum(e.nbytes for e in found)
        line = f"decode cache {cache_dir}: {len(found)} entries, {human(total)}"
        if pruning:
            rules = []
            if cache_max_age_days is not None:
                rules.append(f"unused for more than {cache_max_age_days:g} days")
            if max_bytes is not None:
                rules.append(f"least recently used beyond {human(max_bytes)}")
            line += f"; {len(drop)} to remove ({human(sum(e.nbytes for e in drop))}: {' or '.join(rules)})"
        else:
            line += "; not pruned (--cache-max-bytes N / --cache-max-age DAYS prune it)"
        print(line, flush=True)
    cache_planned = sum(e.nbytes for e in drop)
    planned = run_bytes_planned + cache_planned

    if not delete_now:
        print(
            f"gc (dry run): would free {human(planned)} ({planned} bytes: runs {run_bytes_planned}, decode cache "
            f"{cache_planned}); nothing was changed. `fewscan gc{' ' + suite_ref if suite_ref else ''} --delete` "
            "removes it.",
            flush=True,
        )
        return planned, 0
    n_runs, freed_runs = gc_runs.delete(p)
    freed_cache = cache_prune.remove(drop)
    freed = freed_runs + freed_cache
    print(
        f"gc: removed {n_runs} run(s) and {len(drop)} decode cache entries: freed {human(freed)} ({freed} bytes: "
        f"runs {freed_runs}, decode cache {freed_cache})",
        flush=True,
    )
    return planned, freed
