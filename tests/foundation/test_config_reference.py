"""docs/config-reference.md is generated from the config models by tools/config_reference.py: the committed
file must be what the script writes now, and every key must say what it does."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from pipeline import stage_configs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "config_reference.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_config_reference_is_what_the_script_writes() -> None:
    tool = _tool()
    committed = (REPO / "docs" / "config-reference.md").read_text()
    assert committed == tool.render(), (
        "docs/config-reference.md differs from the config models: run python tools/config_reference.py "
        "and commit the result"
    )


def test_every_key_of_every_stage_is_listed_with_a_description() -> None:
    tool = _tool()
    text = tool.render()
    for stage in stage_configs.ORDER:
        model = stage_configs.config_model(stage)
        rows = tool.rows(model)
        assert {k for k, *_ in rows} >= set(model.model_fields), stage
        undocumented = [k for k, _t, _d, desc in rows if not desc.strip()]
        assert not undocumented, f"{stage}: add Field(description=...) for {undocumented}"
        assert f"## {stage}\n" in text
    # spot checks of the rendering: a nested key, a default, a Literal's choices
    assert "| `inner.steps` | int | 3 |" in text
    assert '| `outer.schedule` | "cosine" \\| "constant" | "cosine" |' in text


def test_check_mode_fails_on_a_stale_file_and_names_the_fix(tmp_path: Path) -> None:
    # the script's --check on a copy of the repository's docs with one line changed
    tool = _tool()
    stale = tmp_path / "config-reference.md"
    stale.write_text(tool.render().replace("| `inner.steps` | int | 3 |", "| `inner.steps` | int | 4 |"))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(stale)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "run python tools/config_reference.py" in out.stderr
    stale.write_text(tool.render())
    ok = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(stale)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
