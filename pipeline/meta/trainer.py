"""The outer loop: Adam + schedule + clipping over meta-batches, periodic validation, resumable checkpoints.

No MLflow here: the caller passes callbacks (`on_metrics`, `on_checkpoint`) and the stage wires them to its
run. A checkpoint holds everything the rest of the run depends on — learner weights (incl. learned inner
rates), optimizer and scheduler state, the episode generator's state, torch's generator states, the step,
the best validation score and the learning curves — so that a run killed at any point and resumed from its
last checkpoint ends with bit-identical weights and metrics (tested in tests/meta/test_resume.py).
"""

from __future__ import annotations

import math
import pickle
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline import distributed
from pipeline.atomic import atomic_open
from pipeline.errors import DataError
from pipeline.meta.algorithms import MetaLearner
from pipeline.meta.methods import FewShotMethod
from pipeline.progress import Bar

CHECKPOINT_VERSION = 1

# (x_s, y_s, x_q, y_q, n_way): x (T, n, C, *spatial) float32, y (T, n) int64
MetaBatch = tuple[Tensor, Tensor, Tensor, Tensor, int]
# one fixed episode: (x_s, y_s, x_q, y_q, n_way) without the task dimension
Episode = tuple[Tensor, Tensor, Tensor, Tensor, int]


@dataclass
class OuterConfig:
    steps: int
    lr: float = 1e-3
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    clip_grad: float | None = 10.0
    val_every: int = 50
    checkpoint_every: int = 50


def lr_factor(step: int, cfg: OuterConfig) -> float:
    """Multiplier of the base outer lr at `step`: linear warmup, then cosine to `min_lr_ratio` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def evaluate_episodes(method: FewShotMethod, episodes: Sequence[Episode]) -> dict[str, float]:
    """Mean query accuracy (and its standard error) of `method` over fixed episodes."""
    accs = []
    for x_s, y_s, x_q, y_q, n_way in episodes:
        proba = method.predict_proba(method.fit(x_s, y_s, n_way), x_q)
        accs.append(float((proba.argmax(-1) == y_q.cpu()).float().mean()))
    if not accs:
        return {}
    a = np.asarray(accs)
    return {"acc": float(a.mean()), "acc_se": float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `MetaTrainer.save` with torch's safe unpickler (`weights_only=True`).

    A checkpoint holds tensors, numbers, strings and containers only (the numpy generator state is a dict
    of ints and strings, the optimizer's and scheduler's states are dicts too), and a resumed run reads it
    from a tracking store that other people may write to (docs/scaling.md, section 2). Full unpickling
    would *run* any object planted in such a file; the safe unpickler refuses it, and so do we, with a
    message instead of a traceback.
    """
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's text goes on to suggest ways to allow the object; keep only what was refused
        found = re.search(r"Unsupported [^.]*?(?= was not|\.|$)", str(err), re.MULTILINE)
        why = found.group(0) if found else ""
        raise DataError(
            f"checkpoint {path} holds more than weights and training state{f' ({why})' if why else ''}; "
            "fewscan never unpickles objects from a checkpoint (they could run code), so it refuses this "
            "file. If you did not write it, someone else may have planted it: check who can edit the run's "
            "experiment, and start a new run instead of resuming this one."
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise DataError(f"checkpoint {path} cannot be read ({err}); start a new run") from None
    if not isinstance(ck, dict):
        raise DataError(f"checkpoint {path} is not a fewscan checkpoint (a {type(ck).__name__}, not a dict)")
    return ck


@dataclass
class TrainState:
    step: int = 0
    best_val: float = -math.inf
    best_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)  # every logged row, in order


class MetaTrainer:
    """Owns the learner, optimizer, scheduler and generators of one method's meta-training."""

    def __init__(
        self,
        learner: MetaLearner,
        cfg: OuterConfig,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        amp_bf16: bool = False,
        dist: distributed.DistContext | None = None,
        meta_batch: int | None = None,
    ):
        self.device = torch.device(device)
        self.learner = learner.to(self.device)
        # data parallel over the meta-batch's tasks: this rank's share weights its mean loss and gradients
        self.dist = dist or distributed.DistContext()
        self.share = (
            distributed.shard_weight(meta_batch, self.dist)
            if self.dist.is_distributed and meta_batch
            else 1.0
        )
        distributed.broadcast_state(self.learner, self.dist)  # every rank starts from rank 0's weights
        self.cfg = cfg
        self.opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.rng = np.random.default_rng(seed)  # episode sampling: the only source of randomness by default
        torch.manual_seed(
            seed
        )  # stochastic layers (MONAI dropout), if any; saved and restored in checkpoints
        self.amp = amp_bf16 and self.device.type == "cuda"
        self.state = TrainState()

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self, batch: MetaBatch) -> dict[str, float]:
        x_s, y_s, x_q, y_q, n_way = batch
        x_s, y_s, x_q, y_q = (t.to(self.device, non_blocking=True) for t in (x_s, y_s, x_q, y_q))
        progress = self.state.step / max(self.cfg.steps, 1)
        self.learner.train()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        self.opt.zero_grad(set_to_none=True)
        with ctx:
            loss, acc = self.learner.meta_backward(x_s, y_s, x_q, y_q, n_way, progress=progress)
        # the meta-batch mean over all ranks (= the single-process value): every rank takes the same decision
        glob = distributed.weighted_mean({"loss": float(loss), "acc": float(acc)}, self.dist, self.share)
        if not math.isfinite(glob["loss"]):
            raise DataError(
                f"meta-training diverged at step {self.state.step} (loss {glob['loss']}); lower meta_train.outer.lr "
                "or meta_train.inner.lr, or enable clipping (meta_train.outer.clip_grad)"
            )
        distributed.average_gradients(self.learner.parameters(), self.dist, self.share)
        params = [p for p in self.learner.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad if self.cfg.clip_grad else math.inf)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.state.step += 1
        return {
            "train_loss": glob["loss"],
            "train_acc": glob["acc"],
            "grad_norm": float(gnorm),
            "outer_lr": lr,
        }

    def validate(self, episodes: Sequence[Episode]) -> dict[str, float]:
        self.learner.eval()
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            # Episodes are small (a few scans): intra-op threads only add synchronisation, and on a shared
            # 2-core machine they stall badly (measured ~10x slower; benchmarks/RESULTS.md (engine)).
            torch.set_num_threads(1)
        try:
            return evaluate_episodes(self.learner.method(), episodes)
        finally:
            torch.set_num_threads(threads)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "method": self.learner.algo.name,
            "step": self.state.step,
            "best_val": self.state.best_val,
            "best_step": self.state.best_step,
            "history": list(self.state.history),
            "learner": {k: v.detach().cpu().clone() for k, v in self.learner.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": {
                "numpy": self.rng.bit_generator.state,
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        if ck.get("version") != CHECKPOINT_VERSION:
            raise DataError(
                f"checkpoint version {ck.get('version')} is not {CHECKPOINT_VERSION}; start a new run"
            )
        if ck.get("method") != self.learner.algo.name:
            raise DataError(f"checkpoint is for method '{ck.get('method')}', not '{self.learner.algo.name}'")
        self.learner.load_state_dict(ck["learner"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.rng.bit_generator.state = ck["rng"]["numpy"]
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        self.state = TrainState(ck["step"], ck["best_val"], ck["best_step"], list(ck["history"]))

    def save(self, path: Path) -> Path:
        """Atomic write (`pipeline/atomic.py`): a kill mid-write leaves the previous checkpoint intact."""
        with atomic_open(path, "wb") as f:
            torch.save(self.state_dict(), f)
        return path

    def load(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path))

    # ------------------------------------------------------------------------------------------ loop
    def fit(
        self,
        sample: Callable[[np.random.Generator], MetaBatch],
        *,
        val_episodes: Sequence[Episode] = (),
        ckpt_dir: Path,
        on_metrics: Callable[[dict[str, float], int], None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None,
        desc: str = "meta-train",
    ) -> TrainState:
        """Train from `self.state.step` to `cfg.steps`.

        `sample(rng)` draws one meta-batch with the trainer's generator (so its state is checkpointed).
        Validation at every `val_every` steps and at the end; `best.pt` when it improves; `last.pt` every
        `checkpoint_every` steps and at the end. Metrics rows are also kept in `state.history`.
        """
        cfg = self.cfg
        bar = Bar(cfg.steps, desc, initial=self.state.step)
        t_last, tasks = time.monotonic(), 0
        try:
            while self.state.step < cfg.steps:
                batch = sample(self.rng)
                row = self.train_step(batch)
                step = self.state.step
                tasks += int(batch[0].shape[0])
                now = time.monotonic()
                rate = tasks / max(now - t_last, 1e-9)
                if self.dist.is_main and (step % cfg.val_every == 0 or step == cfg.steps):
                    row.update(self._validate_and_keep_best(val_episodes, ckpt_dir, on_checkpoint))
                self._record(row, step, on_metrics)
                if self.dist.is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                    path = self.save(ckpt_dir / "last.pt")
                    if on_checkpoint:
                        on_checkpoint(path)
                post: dict[str, float | str] = {
                    "loss": row["train_loss"],
                    "acc": row["train_acc"],
                    "tasks/s": rate,
                }
                if "val_acc" in row:
                    post["val"] = row["val_acc"]
                bar.update(1, **post)
        finally:
            bar.close()
        return self.state

    def _record(self, row: dict[str, float], step: int, on_metrics) -> None:
        self.state.history.append({"step": float(step), **row})
        if on_metrics:
            on_metrics(row, step)

    def _validate_and_keep_best(self, episodes, ckpt_dir: Path, on_checkpoint) -> dict[str, float]:
        if not episodes:
            return {}
        res = self.validate(episodes)
        out = {"val_acc": res["acc"], "val_acc_se": res["acc_se"]}
        # Ties go to the LATER step: when validation sits at one value (typically chance, before anything is
        # learned) the earliest checkpoint would freeze model selection at the start of training.
        if res["acc"] >= self.state.best_val:
            self.state.best_val, self.state.best_step = res["acc"], self.state.step
            path = self.save(ckpt_dir / "best.pt")
            if on_checkpoint:
                on_checkpoint(path)
        return out
