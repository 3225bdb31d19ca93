"""Which files of the `pipeline` package a stage's result can depend on, derived from its imports.

A stage's fingerprint (see docs/CONTRACTS.md, "Tags") hashes its code set, so that `fewscan run` reruns a
stage after an edit to any code it can execute and reuses it after edits that cannot touch it. The set is
derived, not kept by hand: starting from the stage's entry module (`pipeline.<stage>.stage`), every
`import` / `from ... import` (absolute or relative, at module level or inside a function, where the
stages import lazily) and every `importlib.import_module("pipeline...")` literal that names a module of
this package is followed, statically with `ast` (nothing is imported). A package's `__init__.py` comes
with every module below it, as Python runs it on import. A module that reads non-Python files at run time
declares them in a module-level `CODE_DEPENDENCIES` list of globs relative to its folder (the C sources
of the CPU kernels, pipeline/meta/native.py); they join the set when the module does.

`ORCHESTRATION` modules are left out and not followed: they run stages, record them and print progress,
but compute nothing a stage's artifacts contain. Following them would put every stage in every code set
(cli.py imports all of them), so an edit to the tracking code would rerun the whole chain.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parent
# Relative to ROOT. The stage runner (stages.py), the command line (cli.py), the MLflow layer (every module
# of tracking/), the progress log (progress.py) and the run descriptions the MLflow UI shows (ui_view.py,
# text about finished runs, reached only through tracking/): see the module docstring. The tracking layer
# records a stage's outputs but decides none of them: where it saves a model (StageRun.log_pyfunc,
# log_state_dict) it hands MLflow's writers what the stage built, and the stage's code is in its set.
ORCHESTRATION_PACKAGES = ("tracking",)
ORCHESTRATION = frozenset(
    # protocols.py holds typing Protocols only (what a stage module and a run offer), stage_configs.py the
    # stage registry (names, links, help texts; each stage's config model lives in its own package, which
    # is in its code set): neither computes anything an artifact holds
    {"cli.py", "stages.py", "progress.py", "ui_view.py", "protocols.py", "stage_configs.py"}
    | {p.relative_to(ROOT).as_posix() for pkg in ORCHESTRATION_PACKAGES for p in (ROOT / pkg).rglob("*.py")}
)
DEPENDENCIES_NAME = "CODE_DEPENDENCIES"


def _module_file(root: Path, name: str) -> Path | None:
    """The file of module `name` (dotted, starting with PACKAGE) under `root`, or None if it is not one."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve_relative(current: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` written in module `current`."""
    parts = current.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, module] if module else parts)


def _imported_names(tree: ast.AST, current: str, is_package: bool) -> set[str]:
    """Every module name the file may import: for `from X import Y`, both X and X.Y (Y may be a module)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(current, is_package, node.level, node.module)
                if node.level
                else node.module or ""
            )
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if (
                fname == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return names


def _declared_dependencies(tree: ast.Module) -> list[str]:
    """The globs of a module-level `CODE_DEPENDENCIES = [...]` (a literal list of strings)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == DEPENDENCIES_NAME for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{DEPENDENCIES_NAME} must be a literal list of glob strings")
            return list(value)
    return []


def _with_parents(name: str) -> list[str]:
    """`name` and the packages above it (`pipeline`, `pipeline.meta`, ...), whose __init__ runs first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def code_files(entry: str, root: Path | None = None) -> tuple[str, ...]:
    """Sorted paths, relative to `root` (default ROOT, the installed package), of every package file
    reachable from module `entry`. Cached per process: which files a stage can reach changes only when its
    imports do."""
    return _code_files(entry, root or ROOT)


@functools.cache
def _code_files(entry: str, root: Path) -> tuple[str, ...]:
    seen: set[Path] = set()
    data: set[Path] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        for mod in _with_parents(name):
            path = _module_file(root, mod)
            if path is None or path in seen:
                continue
            if path.relative_to(root).as_posix() in ORCHESTRATION:
                continue
            seen.add(path)
            tree = ast.parse(path.read_bytes(), filename=str(path))
            for pattern in _declared_dependencies(tree):
                data.update(p for p in path.parent.glob(pattern) if p.is_file())
            imported = _imported_names(tree, mod, path.name == "__init__.py")
            todo.extend(n for n in imported if n == PACKAGE or n.startswith(PACKAGE + "."))
    return tuple(sorted(p.relative_to(root).as_posix() for p in seen | data))


def device_type(requested: str = "auto") -> str:
    """`cpu` or `cuda`: the device type a stage with this `device` setting runs on (pipeline/meta/device.py)."""
    if requested == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested.split(":", 1)[0]


def numerics(files: tuple[str, ...], device: str = "auto") -> dict[str, str] | None:
    """What besides code, config and inputs moves a stage's floats, for stages that run the engine (meta/).

    The torch version and the device type; on a CPU also which arithmetic the Conv-4 fast paths use (the
    compiled kernels of a given build, or pure torch), since the kernels sum in another order and a
    meta-training run amplifies such rounding like a change of seed (README, "What the demo shows").
    None for stages that never reach meta/ (ingest, episodes): they neither build nor load the kernels.
    """
    if not any(f.startswith("meta/") for f in files):
        return None
    import torch

    dev = device_type(device)
    out = {"torch": torch.__version__, "device": dev}
    if dev == "cuda":
        out["cuda"] = str(torch.version.cuda)
    elif "meta/native.py" in files:
        from pipeline.meta import native

        out["cpu_kernels"] = native.build_id()  # builds the kernels on first use (about a second)
    return out
