"""`fewscan demo` generates its study once per parameter set: the marker file records the parameters."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from pipeline import demo
from pipeline.demodata import generate
from pipeline.suite import load_suite


def test_the_study_is_generated_once_per_parameter_set(tmp_path, monkeypatch):
    params = dict(load_suite("demo_quick").cfg.demo_data or {})
    params["out"] = str(tmp_path / "study")
    suite = SimpleNamespace(path=Path("demo_quick.yaml"), cfg=SimpleNamespace(demo_data=params))
    monkeypatch.setattr(demo, "load_suite", lambda name: suite)
    made = []

    def fake_generate(out, **kw):  # the real generator is tested in test_study.py; here only when it runs
        made.append(kw)
        Path(out).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(generate, "generate_study", fake_generate)
    out = demo.ensure_demo_data("demo_quick")
    marker = out / demo.MARKER
    want = {k: v for k, v in params.items() if k != "out"}
    assert made == [want] and json.loads(marker.read_text()) == want
    assert demo.ensure_demo_data("demo_quick") == out and len(made) == 1  # same parameters: reused
    assert (out / generate.DEMO_SALT_FILE).read_text() == generate.demo_salt(int(want.get("seed", 0))) + "\n"
    demo.ensure_demo_data("demo_quick", regenerate=True)
    params["seed"] = int(want.get("seed", 0)) + 1
    demo.ensure_demo_data("demo_quick")
    assert len(made) == 3 and json.loads(marker.read_text())["seed"] == params["seed"]
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER, generate.DEMO_SALT_FILE]  # no temp files
