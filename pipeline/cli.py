"""The `fewscan` command.

Every stage subcommand takes its config from a YAML file (a data manifest for `ingest`, a task suite
for the rest), the upstream run with `--from RUN_ID` (default: the latest finished upstream run of the
same suite), `--set key=value` overrides, and the stage's own flags. User errors print one line and
exit 2; a failed stage exits 1.

The command line, the suite and the data manifest are validated before torch or mlflow is imported, so a
config error is reported at once (README, "Command line"): this module imports only the light ones at its
top (argparse, pydantic through pipeline.suite), and each command imports the stage machinery after its
checks. tests/foundation/test_cli_imports.py checks which modules a failing command imports.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from pipeline import __version__, stage_configs
from pipeline.errors import ConfigError, DataError, FewscanError, StageFailed

# Each stage's help texts and `--set` example are in its StageSpec (pipeline/stage_configs.py); this is the
# `--set` example of `fewscan run`, valid for the whole suite (tests/foundation/test_cli_help.py).
RUN_SET_EXAMPLE = "episodes.k_shot=[1]"


class _Parser(argparse.ArgumentParser):
    """argparse, plus a suggestion for a mistyped command or choice (`fewscan evalute` -> did you mean
    'evaluate'?), found among the valid choices argparse lists in its message."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            if close:
                message = f"{message[: m.end(1) + 1]}; did you mean '{close[0]}'? {message[m.end(1) + 2 :]}"
        super().error(message)


def _add_common_stage_args(p: argparse.ArgumentParser, spec: stage_configs.StageSpec) -> None:
    if spec.cli_input == "suite":
        (upstream,) = spec.upstream
        p.add_argument(
            "--from",
            dest="from_run",
            metavar="RUN_ID",
            help=f"the {upstream} run to consume, anyone's (default: the latest finished {upstream} run of the "
            "suite, in its own experiments; on a tracking server, one of yours)",
        )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value of this stage's {'section' if spec.section else 'manifest'}, "
        f"e.g. --set {spec.set_example} (repeatable)",
    )
    if spec.resumable:
        p.add_argument(
            "--resume",
            nargs="?",
            const="LATEST",
            metavar="RUN_ID",
            help=f"continue an interrupted {spec.name} run from its last checkpoint (default: the newest "
            f"unfinished {spec.name} run in the suite's experiment; on a tracking server, one of yours)",
        )


def _stage_extra_args(stage: str, p: argparse.ArgumentParser) -> None:
    """Let the stage add its own flags (from its options module: no torch, no mlflow)."""
    try:
        mod = stage_configs.options(stage)
    except ImportError as err:  # a broken stage must not take the whole CLI down
        p.epilog = f"(stage options unavailable: {err})"
        return
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(p)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fewscan",
        description="Few-shot medical imaging with MAML. Every stage is an MLflow run; see `fewscan ui`.",
    )
    parser.add_argument("--version", action="version", version=f"fewscan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)

    p = sub.add_parser(
        "demo",
        help="generate the built-in synthetic study and run the whole chain on it",
        description="Generate the synthetic chest-radiograph study (if not already there) and run "
        f"{' -> '.join(stage_configs.ORDER)} on it (suite tasks/demo.yaml; --quick: tasks/demo_quick.yaml). "
        "Prints where the results are and how to open the MLflow UI.",
    )
    p.add_argument("--quick", action="store_true", help="tiny configuration, ~2 minutes (used by the tests)")
    p.add_argument(
        "--force", action="store_true", help="recompute every stage even if a finished run matches"
    )
    p.add_argument("--regenerate", action="store_true", help="rewrite the demo data even if it exists")

    p = sub.add_parser(
        "make-demo-data",
        help="write the synthetic DICOM study (labels.csv, PACS-like tree, adapt/ folders)",
        description="Write the built-in synthetic chest-radiograph study: real DICOM files from several "
        "simulated vendors in a PACS-like tree, an NIH-style labels.csv, a little realistic junk, and "
        "adapt/support + adapt/query folders of fresh patients for `fewscan adapt`.",
    )
    if wanted in (None, "make-demo-data"):
        try:
            from pipeline.demodata import cli as demo_cli

            demo_cli.add_arguments(p)
        except ImportError as err:
            p.epilog = f"(generator unavailable: {err})"

    for spec in stage_configs.SPECS:  # one command per stage, in chain order (pipeline/stage_configs.py)
        p = sub.add_parser(spec.name, help=spec.summary, description=spec.description)
        if spec.cli_input == "manifest":
            p.add_argument(
                "manifest", help="data manifest YAML (e.g. data_manifests/demo.yaml, or a bare name: demo)"
            )
            p.add_argument(
                "--suite", help="file the run under this suite's MLflow experiment (default: the dataset's)"
            )
        elif spec.cli_input == "suite":
            p.add_argument("suite", help="task suite YAML (e.g. tasks/demo.yaml, or a bare name: demo)")
        else:  # "model": the upstream is a meta-model, named by a run id or a registry reference
            (upstream,) = spec.upstream
            p.add_argument(
                "suite",
                nargs="?",
                help=f"task suite whose `{spec.section}:` section gives defaults (optional)",
            )
            p.add_argument(
                "--model",
                metavar="REF",
                help=f"meta-model: a {upstream} run id, models:/NAME@ALIAS, NAME@ALIAS or models:/NAME/VERSION "
                f"(default: the latest finished {upstream} run of the suite)",
            )
        _add_common_stage_args(p, spec)
        if wanted == spec.name:
            _stage_extra_args(spec.name, p)

    p = sub.add_parser(
        "predict",
        help="new scans -> a CSV of class probabilities, with an adapted model",
        description="Predict with an adapted model: one CSV row per scan (path, predicted class, one "
        "probability column per class); an unreadable file gets a row with its error. The last line says "
        "where the CSV was written; an existing file is never replaced without --overwrite.",
    )
    p.add_argument(
        "--model", required=True, help="adapted model URI (models:/NAME@ALIAS, runs:/ID/model, ...)"
    )
    p.add_argument("--input", required=True, type=Path, help="a scan file or a folder of scans")
    p.add_argument(
        "--output", type=Path, default=None, help="CSV to write (default: predictions.csv in this folder)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the --output CSV if it already exists")
    p.add_argument(
        "--salt-file",
        type=Path,
        default=Path(".fewscan/salt"),
        help="ingest's salt (log lines name files by salted key; default .fewscan/salt)",
    )
    p.add_argument(
        "--local-report-dir",
        type=Path,
        default=Path(".fewscan/reports"),
        help="where predict.paths.json maps those keys back to paths (local only; default .fewscan/reports)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for scoring (default: all available)"
    )

    p = sub.add_parser(
        "run",
        help="run the whole chain for a suite, reusing unchanged finished stages",
        description=f"Run {' -> '.join(stage_configs.ORDER)} as one parent MLflow run with "
        "a nested run per stage. A stage whose fingerprint (config, upstream run ids, code version) matches a "
        "finished run is reused; a stage that another live run is computing (another `fewscan run` of the "
        "same suite) is waited for and then reused; --force recomputes all.",
    )
    p.add_argument("suite", help="task suite YAML or bare name")
    p.add_argument("--force", action="store_true", help="recompute every stage (never waits)")
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop (exit 2) after waiting this long for another run computing the same stage "
        "(default: wait while that run is alive)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a suite value, e.g. --set {RUN_SET_EXAMPLE} (repeatable)",
    )

    p = sub.add_parser(
        "status",
        help="each stage's latest run, its state and whether `fewscan run` would reuse it",
        description="List each stage's latest run of a suite (without SUITE: of every fewscan experiment), "
        "its state (RUNNING, FINISHED, FAILED, KILLED) and whether `fewscan run SUITE` would reuse it. Runs "
        "whose process is gone (killed, machine restarted) are marked KILLED first, as by every command.",
    )
    p.add_argument("suite", nargs="?", help="task suite YAML or bare name (default: all fewscan experiments)")

    p = sub.add_parser(
        "gc",
        help="list (dry run) or --delete the artifacts of runs nothing needs, and prune the decode cache",
        description="List the runs nothing needs any more (older --force reruns, FAILED/KILLED runs) with "
        "their sizes; --delete removes them. Kept: the newest finished run of each stage and what it was "
        "built from, registered models with an alias and each model's newest version, running runs "
        "(docs/storage.md). Only your own fewscan experiments and runs are touched.",
    )
    p.add_argument(
        "suite", nargs="?", help="only this suite's experiment (default: every fewscan experiment)"
    )
    p.add_argument("--delete", action="store_true", help="remove what is listed (default: a dry run)")
    p.add_argument("--cache-max-bytes", metavar="N", help="prune the decode cache to N bytes (e.g. 2G), LRU")
    p.add_argument(
        "--cache-max-age", type=float, metavar="DAYS", help="prune decode cache entries unused for DAYS"
    )
    p.add_argument(
        "--cache-dir", type=Path, help="the decode cache (default: the suite manifest's cache_dir)"
    )

    p = sub.add_parser(
        "ui",
        help="start the MLflow UI on the fewscan store (127.0.0.1)",
        description="Start the MLflow UI on the tracking store fewscan uses (MLFLOW_TRACKING_URI, "
        "else ./mlflow/mlflow.db), bound to the loopback interface by default.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=5000, help="port of the UI (default 5000): http://HOST:PORT")
    return parser


# ------------------------------------------------------------------------------------------ commands
# Each command validates its command line, suite and manifest first and imports the stage machinery
# (pipeline.stages, .tracking, .chain: torch and mlflow) only after, so a config error costs no heavy import.
def _stage_overrides(stage: str, args: argparse.Namespace) -> list[str]:
    out = list(getattr(args, "overrides", []) or [])
    mod = stage_configs.options(stage)
    if hasattr(mod, "overrides_from_args"):
        out += list(mod.overrides_from_args(args))
    return out


# The command of each stage, by what it is given (StageSpec.cli_input): a data manifest, a suite, a model.
def _manifest_stage(stage: str, args: argparse.Namespace) -> int:
    from pipeline.suite import dataset_name, find_file, load_manifest

    path = find_file(args.manifest, "data_manifests")
    cfg = load_manifest(path, _stage_overrides(stage, args))
    from pipeline import stages  # validated: now torch and mlflow

    stages.execute_stage(stage, cfg, upstream={}, suite=args.suite, dataset=dataset_name(cfg, path))
    return 0


def _suite_stage(stage: str, args: argparse.Namespace) -> int:
    from pipeline.suite import dataset_name, load_manifest, load_suite

    suite = load_suite(args.suite)
    cfg = suite.stage_config(stage, _stage_overrides(stage, args))
    dataset = dataset_name(load_manifest(suite.manifest_path), suite.manifest_path)
    from pipeline import stages, tracking  # validated: now torch and mlflow

    (up_stage,) = stage_configs.UPSTREAM[stage]
    upstream = {
        up_stage: tracking.resolve_upstream(up_stage, args.from_run, suite=suite.name, dataset=dataset)
    }
    resume = None
    if getattr(args, "resume", None):
        resume = args.resume
        if resume == "LATEST":
            resume = tracking.latest_unfinished(stage, suite.name)
            if resume is None:
                raise FewscanError(f"--resume: no unfinished {stage} run of suite '{suite.name}' to resume")
        # resume continues the run with the upstream it was started on
        upstream = {up_stage: tracking.UpstreamRun.from_id(_recorded_upstream(resume, up_stage), up_stage)}
    if stage_configs.spec(stage).distributed:
        from pipeline import distributed

        dctx = distributed.init_from_env(device=getattr(cfg, "device", "auto"))
        if dctx.is_distributed:
            # every rank consumes the episodes run that rank 0 resolved
            rid = distributed.broadcast_object(upstream[up_stage].run_id if dctx.is_main else None, dctx)
            upstream = {up_stage: tracking.UpstreamRun.from_id(str(rid), up_stage)}
    stages.execute_stage(
        stage, cfg, upstream=upstream, suite=suite.name, dataset=dataset, resume_run_id=resume
    )
    return 0


def _recorded_upstream(run_id: str, stage: str) -> str:
    from pipeline import tracking

    tags = tracking.retry(lambda: tracking.client().get_run(run_id), "read a run").data.tags
    rid = tags.get(tracking.TAG_UPSTREAM + stage)
    if not rid:
        raise FewscanError(f"run {run_id} records no upstream {stage} run; cannot resume it")
    return str(rid)


def _check_sets_exist(cfg: Any, args: argparse.Namespace, overrides: list[str], suite: Path | None) -> None:
    """A support or query set that does not exist is refused here, before a run starts, naming the path as
    the user typed it and where it was typed. Inside the run, a path in an error message would be recorded
    in MLflow (tag fewscan.error), so the stage can only name it by its salted key (docs/adapt.md)."""
    for key in ("support", "query"):
        path = getattr(cfg, key, None)
        if path is None or Path(path).exists():
            continue
        if getattr(args, key, None) is not None:
            where = f"--{key}"
        elif any(o.strip().startswith(f"{key}=") for o in overrides):
            where = f"--set {key}"
        else:
            where = f"adapt.{key} in {suite}"
        raise ConfigError(
            f"{where}: {path} not found (relative paths resolve against {Path.cwd()}); give a folder with "
            "one subfolder per class, or a CSV with the columns path,label (docs/adapt.md)"
        )


def _model_stage(stage: str, args: argparse.Namespace) -> int:
    from pipeline.config import apply_overrides, validate
    from pipeline.suite import load_suite

    (up_stage,) = stage_configs.spec(stage).upstream
    overrides = _stage_overrides(stage, args)
    suite_path: Path | None = None
    if args.suite:
        suite = load_suite(args.suite)
        cfg = suite.stage_config(stage, overrides)
        suite_name: str | None = suite.name
        suite_path = suite.path
    else:
        cfg = validate(apply_overrides({}, overrides), stage_configs.config_model(stage), "command line")
        suite_name = None
    if not args.model and not suite_name:
        raise FewscanError(
            f"{stage} needs a meta-model: pass --model REF or a suite whose {up_stage} run exists"
        )
    _check_sets_exist(cfg, args, overrides, suite_path)
    from pipeline import stages, tracking  # validated: now torch and mlflow

    if args.model:
        run_id = tracking.resolve_model_ref(args.model)
        meta = tracking.UpstreamRun.from_id(run_id, up_stage)
    else:
        meta = tracking.latest_run(up_stage, suite=str(suite_name))
    suite_tag = suite_name or meta.tags.get(tracking.TAG_SUITE)
    stages.execute_stage(
        stage,
        cfg,
        upstream={up_stage: meta},
        suite=suite_tag,
        dataset=meta.tags.get(tracking.TAG_DATASET),
    )
    return 0


def predict_output(output: Path | None, overwrite: bool) -> Path:
    """Where `fewscan predict` writes: --output as typed, else predictions.csv in the working folder (shown
    in full, since the user did not type it). An existing file is refused without --overwrite: a second
    predict must not silently replace the results of the first."""
    path = output if output is not None else Path.cwd() / "predictions.csv"
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; give a file name such as {path / 'predictions.csv'}")
    if path.exists() and not overwrite:
        what = "--output" if output is not None else "the default --output"
        raise ConfigError(
            f"{what} {path} already exists; give another --output PATH, or --overwrite to replace it"
        )
    return path


def cmd_predict(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if not args.input.exists():
        raise ConfigError(
            f"--input {args.input} not found (relative paths resolve against {Path.cwd()}); "
            "give a scan file or a folder of scans"
        )
    output = predict_output(args.output, args.overwrite)
    from pipeline.adapt.predict import predict  # validated: now torch and mlflow

    summary = predict(
        args.model,
        args.input,
        output,
        threads=args.threads,
        salt_file=args.salt_file,
        local_report_dir=args.local_report_dir,
    )
    if summary["n_scans"] and not summary["n_predicted"]:
        # a CSV of nothing but errors is no result: a script checking the exit code must see it
        raise DataError(
            f"none of the {summary['n_scans']} scan(s) under --input could be read, so nothing was predicted; "
            f"the error column of {output} says why for each (wrong format, or not the model's modality)"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.suite import load_suite

    suite = load_suite(args.suite, args.overrides)
    # every stage's config and the manifest, before the chain (torch, mlflow) is imported
    for stage in stage_configs.chain_stages(suite.cfg):
        cfg = suite.stage_config(stage)
        if stage_configs.spec(stage).cli_input == "model":  # its support/query sets
            _check_sets_exist(cfg, args, [], suite.path)
    from pipeline.chain import run_chain

    run_chain(suite, force=args.force, wait_timeout_s=args.wait_timeout)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline import demo

    return demo.run_demo(quick=args.quick, force=args.force, regenerate=args.regenerate)


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from pipeline.demodata import cli as demo_cli

    return int(demo_cli.run(args) or 0)


def cmd_status(args: argparse.Namespace) -> int:
    if args.suite:
        from pipeline.suite import load_suite

        load_suite(args.suite)  # a missing or invalid suite is reported before mlflow is imported
    from pipeline.status import status_lines

    print("\n".join(status_lines(args.suite)), flush=True)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from pipeline import gc

    gc.run(
        args.suite,
        delete_now=args.delete,
        cache_dir=args.cache_dir,
        cache_max_bytes=args.cache_max_bytes,
        cache_max_age_days=args.cache_max_age,
    )
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pipeline import tracking

    uri = tracking.tracking_uri()
    exe = shutil.which("mlflow")
    cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
    cmd += ["ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if tracking.is_default_store():
        tracking.client()  # creates ./mlflow/ and the database if they are missing
        cmd += ["--default-artifact-root", tracking.default_artifact_root()]
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop); in its model-training view:", flush=True)
    print("\n".join(tracking.ui_lines(base)), flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: binding beyond loopback exposes the runs to your network", file=sys.stderr)
    return serve_until_stopped(cmd)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve_until_stopped(cmd: list[str], grace_s: float = 10.0) -> int:
    """Run `cmd` (the MLflow server) in a process group of its own and stop the whole group when this
    process gets SIGTERM, SIGINT or SIGHUP, or returns for any reason. The server forks workers (uvicorn,
    gunicorn, huey): stopping only the process we started left them answering on the port. Its own group
    also keeps a terminal's Ctrl-C from reaching the server twice. Returns the exit status (128 + the
    signal when stopped by one). A SIGKILL of this process cannot be caught: the group then stays up."""
    proc = subprocess.Popen(cmd, start_new_session=True)  # new session => new process group, id = its pid
    got: list[int] = []

    def _on_signal(signum: int, _frame: Any) -> None:
        got.append(signum)
        _signal_group(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        rc = proc.wait()
    finally:
        _stop_group(proc, grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + got[0] if got else rc


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the process group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # macOS: a group of zombies only; nothing left to stop
        return False
    return True


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM to the group, then SIGKILL to what is left after `grace_s`, and reap our child."""
    import time

    if _signal_group(proc.pid, signal.SIGTERM):
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is None:
                time.sleep(0.1)
                continue
            if not _signal_group(proc.pid, 0):  # leader reaped and no member left
                break
            time.sleep(0.1)
        else:
            _signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


COMMANDS: dict[str, Any] = {
    "demo": cmd_demo,
    "make-demo-data": cmd_make_demo_data,
    **{
        spec.name: functools.partial(
            {"manifest": _manifest_stage, "suite": _suite_stage, "model": _model_stage}[spec.cli_input],
            spec.name,
        )
        for spec in stage_configs.SPECS
    },
    "predict": cmd_predict,
    "run": cmd_run,
    "status": cmd_status,
    "gc": cmd_gc,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # under torchrun: an uncaught exception's traceback goes into torchrun's failure summary
        from torch.distributed.elastic.multiprocessing.errors import record

        return int(record(_main)(argv) or 0)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # mlflow probes git; no warning spam without it
    try:
        return int(COMMANDS[args.command](args) or 0)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FewscanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
