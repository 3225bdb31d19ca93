"""`fewscan demo`: generate the built-in synthetic study (once) and run the chain on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import atomic, tracking
from pipeline.artifacts import ResultsFile, read_artifact
from pipeline.chain import run_chain
from pipeline.errors import ConfigError
from pipeline.evaluate.report import learned_table
from pipeline.progress import log
from pipeline.suite import load_suite

MARKER = ".fewscan-demo.json"  # the generator parameters the folder was written with


def ensure_demo_data(suite_name: str, regenerate: bool = False) -> Path:
    """Generate the suite's demo data unless the folder already holds data made with the same parameters."""
    from pipeline.demodata.generate import generate_study, write_demo_salt

    suite = load_suite(suite_name)
    dd = dict(suite.cfg.demo_data or {})
    if "out" not in dd:
        raise ConfigError(f"{suite.path}: `demo_data.out` is missing; it names the folder the manifest reads")
    out = Path(dd.pop("out"))
    marker = out / MARKER
    if not regenerate and marker.is_file() and json.loads(marker.read_text()) == dd:
        log(f"demo data already in {out} (same parameters); not regenerating (--regenerate forces it)")
        write_demo_salt(out, int(dd.get("seed", 0)))  # folders generated before the demo had its own salt
        return out
    log(f"generating the synthetic study into {out} ({dd})")
    generate_study(out, **dd)
    atomic.write_json(marker, dd, sort_keys=True)
    return out


def run_demo(quick: bool = False, force: bool = False, regenerate: bool = False) -> int:
    suite_name = "demo_quick" if quick else "demo"
    t0 = time.monotonic()
    data_dir = ensure_demo_data(suite_name, regenerate=regenerate)
    result = run_chain(suite_name, force=force)
    ev = result.outcomes.get("evaluate")
    lines = [
        "",
        f"fewscan demo ({suite_name}) done in {time.monotonic() - t0:.0f} s.",
        f"  data:     {data_dir.resolve()}",
        f"  tracking: {tracking.tracking_uri()}",
    ]
    if ev is not None:
        up = tracking.UpstreamRun.from_id(ev.run_id, "evaluate")
        try:
            lines.append(f"  report:   {up.artifact('report.md')}")
        except Exception:  # noqa: BLE001 - a remote store has no local path to print
            lines.append(f"  report:   report.md in evaluate run {ev.run_id}")
        results = read_artifact(ResultsFile, up.artifact(ResultsFile.FILE))
        lines[1:1] = ["", *learned_table(results), ""]
    lines += [
        f"  runs:     {tracking.experiment_url(result.experiment_id)}",
        "  open the MLflow UI with:  fewscan ui   (then the runs link above: experiment 'fewscan/"
        + suite_name
        + "', model-training view)",
    ]
    print("\n".join(lines), flush=True)
    return 0
