"""episodes/*.jsonl: one episode per line, written atomically (an episode stream that fails midway
leaves the previous file, not part of a new one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.episodes.episode import Episode, load_episodes, write_episodes


def _episode(i: int) -> Episode:
    return Episode(id=i, kind="binary", k_shot=1, classes=["Hernia", "rest"],
                   support={"Hernia": [f"h{i}"], "rest": [f"r{i}"]},
                   query={"Hernia": [f"hq{i}"], "rest": [f"rq{i}"]})  # fmt: skip


def test_episodes_round_trip_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "episodes" / "val.jsonl"
    eps = [_episode(i) for i in range(3)]
    assert write_episodes(path, iter(eps)) == 3
    assert load_episodes(path) == eps
    assert path.read_text().count("\n") == 3 and [p.name for p in path.parent.iterdir()] == ["val.jsonl"]


def test_a_stream_that_fails_midway_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    write_episodes(path, [_episode(0)])
    before = path.read_bytes()

    def stream():
        yield _episode(1)
        yield _episode(2)
        raise RuntimeError("sampler ran out of patients")

    with pytest.raises(RuntimeError, match="ran out"):
        write_episodes(path, stream())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["test.jsonl"]
