"""Whose runs fewscan uses: the server user, and the proof that an experiment is theirs.

On a shared tracking server other people can create experiments and runs, and (with edit rights they
grant) make them visible and writable to you. fewscan therefore consumes, reuses and resumes only
runs of the suite's own experiment(s) (`search_scope`) and, on a server with a user, only runs of
experiments that user created and only runs that user created (docs/scaling.md, "Whose runs fewscan
uses"). A run named by id (--from, --resume RUN_ID, --model) is the user's explicit choice and is used
wherever it lives.

What MLflow 3.17's basic-auth server does and does not vouch for:
- a run's user_id is whatever the client sends in CreateRun (MlflowClient takes it from the tag
  `mlflow.user`); the server does not set it to the authenticated user, so anyone who may create
  runs in an experiment can create runs "by alice";
- the creator of an experiment gets MANAGE on it, but nothing records who created it, and a MANAGE
  holder may grant MANAGE to anyone: "I can manage it" does not mean "I created it".
So the user_id filter only separates your runs from those of people you yourself let write into your
experiment, and the experiment's owner is proven with a secret only the owner has: when fewscan
creates an experiment it tags it with an HMAC of (user, experiment id) under a random key kept in
the user's own key file (`owner_key_file`). Another user can copy the tag but not compute it for
his experiment's id, and the key is no password (the tag gives nothing to guess a password from).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import TrackingError
from pipeline.progress import log
from pipeline.tracking.store import client, retry, tracking_uri
from pipeline.tracking.tags import TAG_OWNER, TAG_OWNER_PROOF


def server_user() -> str | None:
    """The tracking user when the store is an http(s) server with a basic-auth user, else None."""
    if not tracking_uri().startswith(("http://", "https://")):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or None
    if user and ("'" in user or "\\" in user):
        raise TrackingError(
            f"MLFLOW_TRACKING_USERNAME {user!r} contains a quote or a backslash; fewscan selects runs by "
            "their user and cannot quote such a name in an MLflow search. Use a user name without them."
        )
    return user


def owner_key_file() -> Path:
    env = os.environ.get("FEWSCAN_OWNER_KEY_FILE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "fewscan" / "owner.key"


def _create_key(path: Path) -> None:
    """Write a new random key to `path` unless one is there: complete when it appears (written and fsynced
    in a temp file first, as pipeline/atomic.py does) and never replacing a key another process made at
    the same time (a hard link fails on an existing name, where a rename would replace it: experiments
    signed with the replaced key would no longer count as the user's)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: its key is the key
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _owner_key() -> bytes:
    """This user's secret owner key, created (mode 0600) on first use."""
    path = owner_key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _create_key(path)
    if path.stat().st_mode & 0o077:
        raise TrackingError(
            f"the fewscan owner key {path} can be read by other users; `chmod 600 {path}` (whoever read it "
            "can pass off experiments as yours: delete it instead if others may have copied it)"
        )
    key = path.read_text().strip()
    if len(key) < 32:
        raise TrackingError(
            f"the fewscan owner key {path} is damaged (too short); delete it to make a new one"
        )
    return key.encode()


def _owner_proof(key: bytes, user: str, exp_id: str) -> tuple[str, str]:
    """(tag key, tag value) proving that `user`, holding `key`, created experiment `exp_id`."""
    key_id = hashlib.sha256(b"fewscan-owner-key-id\0" + key).hexdigest()[:12]
    msg = f"fewscan-experiment-owner/1\0{user}\0{exp_id}".encode()
    return TAG_OWNER_PROOF + key_id, hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign_experiment(exp_id: str, user: str) -> None:
    tag, proof = _owner_proof(_owner_key(), user, exp_id)
    c = client()
    retry(lambda: c.set_experiment_tag(exp_id, TAG_OWNER, user), "tag the experiment's owner")
    retry(lambda: c.set_experiment_tag(exp_id, tag, proof), "tag the experiment's owner")


def _claimed(name: str) -> bool:
    claims = os.environ.get("FEWSCAN_CLAIM_EXPERIMENT", "")
    return name in [c.strip() for c in claims.split(",")]


def is_owned(exp: Any, user: str) -> bool:
    """Whether `user` created experiment `exp` with fewscan (or claims it now with FEWSCAN_CLAIM_EXPERIMENT)."""
    tag, proof = _owner_proof(_owner_key(), user, str(exp.experiment_id))
    if hmac.compare_digest(str(exp.tags.get(tag, "")), proof):
        return True
    if _claimed(exp.name):
        sign_experiment(str(exp.experiment_id), user)
        log(f"claimed experiment '{exp.name}' as {user}'s (FEWSCAN_CLAIM_EXPERIMENT); unset it now")
        return True
    return False


def not_owned_message(name: str, user: str) -> str:
    return (
        f"experiment '{name}' on {tracking_uri()} was not created by you ({user}) with fewscan, so fewscan "
        "neither writes into it nor uses its runs: whoever created it and gave you access could have planted "
        "runs in it. Give your suite another name (`name:` in the suite file). If the experiment is yours "
        f"(made before fewscan recorded owners, or on another machine: copying {owner_key_file()} from there "
        f"also works), check its runs in the UI and claim it once with FEWSCAN_CLAIM_EXPERIMENT='{name}'."
    )


def runs_filter(clauses: Iterable[str]) -> str:
    """A search filter of `clauses`, restricted on a server to the runs the current user created."""
    out = list(clauses)
    user = server_user()
    if user:
        out.append(f"attributes.user_id = '{user}'")
    return " and ".join(out)
