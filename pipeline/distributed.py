"""Distributed meta-training primitives for `torchrun` (torch.distributed; gloo on CPU, NCCL on CUDA).

Data parallelism over the TASKS of a meta-batch: every rank samples the WHOLE meta-batch from the same
seeded generator (so the generator state stays identical everywhere and the episodes are exactly the
single-process run's), keeps its contiguous slice (`shard`), runs the one inner loop on it, and the
meta-gradients are all-reduced with weights |slice| / |meta-batch| (`average_gradients`), so the update is
the single-process mean over the full meta-batch even when the meta-batch does not divide evenly (and
when a rank gets no task at all). `broadcast_state` / `broadcast_object` make all ranks start from rank 0's
weights (fresh start and resume from a checkpoint that only rank 0 read).

Failure handling (why no job hangs):
- Under `torchrun`, the elastic agent watches its worker processes: when one exits non-zero it sends
  SIGTERM (then SIGKILL after a grace period) to the others and exits non-zero itself with a
  `ChildFailedError` summary naming the failed rank (with `--max-restarts 0`, the default, no restart).
  A peer that is blocked in a gloo collective when the other side dies gets "connection closed" at once.
- A rank that is ALIVE but stuck (deadlock, hung filesystem, a rank that skipped a collective) is not
  seen by torchrun. Every collective here therefore runs under the process group's bounded `timeout`
  (`init_process_group(timeout=...)`, default `DEFAULT_TIMEOUT_S`, env `FEWSCAN_DIST_TIMEOUT_S`), and
  `DistContext.barrier` is a gloo `monitored_barrier` that names the ranks that did not arrive. A
  collective that fails or times out raises `DistributedError` naming the step, this rank and the cause;
  the CLI prints it as one line and exits non-zero, and torchrun then ends the remaining ranks.
- NCCL: `TORCH_NCCL_ASYNC_ERROR_HANDLING` (on by default in torch 2.x) aborts a timed-out collective.

The timeout must be longer than the longest gap between two collectives, including rank 0's checkpoint
upload to the tracking store while the other ranks already wait in the next all-reduce.

Nothing here imports mlflow: rank-0-only logging is the caller's business (`ctx.is_main`), and
`FollowerRun` is the no-op stand-in for the MLflow stage run on the other ranks.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.errors import FewscanError
from pipeline.protocols import NullRun

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "FEWSCAN_DIST_TIMEOUT_S"
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(FewscanError):
    """A distributed run cannot go on: bad launch environment, or another rank failed / timed out."""


# --------------------------------------------------------------------------------------------- context
@dataclass
class DistContext:
    """Where this process stands in the job. The single-process context (world_size 1) makes every
    collective here a no-op, so the meta-train stage has one code path with or without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: not distributed
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False  # True when init_from_env created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs to MLflow and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank, at most `timeout_s`. With gloo a monitored barrier, so rank 0's error names
        the ranks that did not arrive (a dead or stuck rank), instead of a bare timeout."""
        if not self.is_distributed:
            return
        try:
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
            elif self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()
        except RuntimeError as err:
            raise _collective_error(what, self, err) from err

    def shutdown(self) -> None:
        """Destroy the process group if this context created it (idempotent)."""
        global _current
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
        if _current is self:
            _current = None

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def describe(self) -> str:
        if not self.is_distributed:
            return "single process"
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank}, {self.backend}, {self.device})"


_current: DistContext | None = None


def _env_int(env: Mapping[str, str], key: str) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        present = ", ".join(k for k in _TORCHRUN_VARS if k in env) or "none"
        raise DistributedError(
            f"WORLD_SIZE={env.get('WORLD_SIZE')} says this is a distributed launch, but {key} is not set "
            f"(set: {present}). Launch with `torchrun --nproc_per_node N ...`, which sets "
            f"{', '.join(_TORCHRUN_VARS)}; or unset WORLD_SIZE for a single-process run."
        )
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{key}={raw!r} is not an integer (as torchrun would set it)") from None


def timeout_from_env(env: Mapping[str, str] | None = None, default: float = DEFAULT_TIMEOUT_S) -> float:
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV)
    if not raw:
        return default
    try:
        val = float(raw)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if val <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return val


def init_from_env(
    timeout_s: float | None = None,
    device: str = "auto",
    backend: str | None = None,
    env: Mapping[str, str] | None = None,
) -> DistContext:
    """The context of this process: torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    `MASTER_PORT`) with `torch.distributed` initialised, or a single-process context when not launched
    by torchrun (no `WORLD_SIZE`, or `WORLD_SIZE=1`).

    Args:
        timeout_s: bound on every collective and on the rendezvous; default env `FEWSCAN_DIST_TIMEOUT_S`
            or `DEFAULT_TIMEOUT_S`.
        device: `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`. Distributed, a CUDA
            process always takes `cuda:LOCAL_RANK` (one process per GPU).
        backend: `gloo` / `nccl`; default NCCL on CUDA, gloo on CPU.
        env: the environment to validate (tests); default `os.environ`. The process group itself always
            joins through `env://`, i.e. `os.environ` (under torchrun: the agent's store).

    Idempotent: a second call returns the same context (see `current()`). If the caller already
    initialised `torch.distributed`, that group is used and left to the caller to destroy.
    """
    global _current
    if _current is not None:
        return _current
    env = os.environ if env is None else env
    timeout = float(timeout_s) if timeout_s is not None else timeout_from_env(env)
    if timeout <= 0:
        raise DistributedError(f"timeout_s must be > 0 seconds, got {timeout}")
    world = _env_int(env, "WORLD_SIZE") if env.get("WORLD_SIZE") else 1
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistributedError(f"device '{device}' was requested but CUDA is not available; use auto or cpu")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise DistributedError(f"unknown device '{device}'; valid: auto, cpu, cuda")

    if world <= 1:
        dev = (
            torch.device(device if device.startswith("cuda") else "cuda")
            if want_cuda
            else torch.device("cpu")
        )
        _current = DistContext(device=dev, timeout_s=timeout)
        return _current

    rank = _env_int(env, "RANK")
    local_rank = _env_int(env, "LOCAL_RANK")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key):
            raise DistributedError(
                f"{key} is not set for a {world}-process launch; torchrun sets it (use "
                "`--master_addr/--master_port` or `--rdzv_endpoint`)"
            )
    _env_int(env, "MASTER_PORT")
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; install a build that has it")

    if want_cuda:
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but this node has {n_gpu} CUDA device(s): use "
                f"--nproc_per_node {n_gpu} (one process per GPU)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    be = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if be == "nccl" and dev.type != "cuda":
        raise DistributedError("backend nccl needs CUDA devices; use gloo on CPU")

    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=be,
                init_method="env://",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout),
                device_id=dev if dev.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as err:
            raise DistributedError(
                f"rank {rank}: could not join the process group at {env.get('MASTER_ADDR')}:"
                f"{env.get('MASTER_PORT')} within {timeout:.0f} s ({type(err).__name__}: {err}). "
                "Check that every node can reach the rendezvous address and that all ranks were started."
            ) from err
        owns = True
    ctx = DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=dev,
        backend=be,
        timeout_s=timeout,
        owns_group=owns,
    )
    if owns:
        atexit.register(ctx.shutdown)
    _current = ctx
    return ctx


def current() -> DistContext:
    """The process-wide context (`init_from_env()` on first use)."""
    return _current if _current is not None else init_from_env()


def _collective_error(what: str, ctx: DistContext, err: BaseException) -> DistributedError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        why = (
            f"another rank did not reach it within {ctx.timeout_s:.0f} s (stuck, or much slower: raise "
            f"{TIMEOUT_ENV} if a step or a checkpoint upload legitimately takes longer)"
        )
    elif "closed" in low or "reset" in low or "broken pipe" in low or "crash" in low:
        why = "another rank died (see its error above; torchrun names the first failed rank)"
    else:
        why = "another rank died, was stopped, or did not reach it in time (see the other ranks' errors)"
    return DistributedError(f"rank {ctx.rank}/{ctx.world_size}: {what} failed: {why}. Cause: {text}")


# --------------------------------------------------------------------------------------------- sharding
def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items: sizes differ by at most one, the first
    n % world_size ranks take the extra item, ranks past n take nothing."""
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard request: n={n}, rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's slice of the meta-batch. Concatenated in rank order, the slices are `items`, so
    when every rank draws the whole meta-batch from the same generator the episodes are exactly the
    single-process run's."""
    start, stop = shard_bounds(len(items), ctx.rank, ctx.world_size)
    return list(items[start:stop])


def shard_weight(n: int, ctx: DistContext) -> float:
    """This rank's share |slice| / n: the weight of its mean loss / gradient in the global mean."""
    if n <= 0:
        raise ValueError(f"a meta-batch needs at least one task, got {n}")
    start, stop = shard_bounds(n, ctx.rank, ctx.world_size)
    return (stop - start) / n


# --------------------------------------------------------------------------------------------- reductions
def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def average_gradients(parameters: Iterable[nn.Parameter | Tensor], ctx: DistContext, weight: float) -> None:
    """All-reduce `.grad` in place to sum_r weight_r * grad_r, with weight_r = this rank's share of the
    meta-batch (`shard_weight`). Since each rank's grad is that of the MEAN loss over its own tasks, the
    result is the gradient of the mean over the whole meta-batch, identical on every rank.

    A rank with no task (meta-batch smaller than the world) calls this with weight 0: its `.grad` is
    ignored (treated as zeros) but it still takes part in the collective. A parameter that has no
    gradient on ANY rank keeps `grad=None` (so optimizers skip it exactly as in one process). One
    all-reduce of one flat buffer per call.
    """
    params = [p for p in parameters if p.requires_grad]
    if not ctx.is_distributed:
        if abs(weight - 1.0) > 1e-12:
            raise ValueError(f"a single process holds the whole meta-batch: weight must be 1, got {weight}")
        return
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be this rank's share of the meta-batch in [0, 1], got {weight}")
    dev = _comm_device(ctx)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    chunks: list[Tensor] = []
    for p in params:
        if p.grad is None or weight == 0.0:
            chunks.append(torch.zeros(p.numel(), dtype=dtype, device=dev))
        else:
            chunks.append(p.grad.detach().reshape(-1).to(device=dev, dtype=dtype) * weight)
    # the last len(params) entries count, per parameter, the ranks that had a gradient for it
    has = [float(p.grad is not None and weight > 0.0) for p in params]
    flat = torch.cat(chunks + [torch.tensor(has, dtype=dtype, device=dev)])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except RuntimeError as err:
        raise _collective_error("the all-reduce of the meta-gradients", ctx, err) from err
    counts = flat[-len(params) :] if params else flat[:0]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if counts[i].item() == 0:
            p.grad = None
        else:
            g = flat[offset : offset + n].view(p.shape).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


def weighted_mean(values: Mapping[str, float], ctx: DistContext, weight: float) -> dict[str, float]:
    """sum_r weight_r * value_r for each key (e.g. the mean query loss and accuracy of the meta-batch,
    for rank 0 to log). Same keys, same order, on every rank; a rank with weight 0 passes anything."""
    keys = list(values)
    if not ctx.is_distributed:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor(
        [float(values[k]) * weight if weight > 0 else 0.0 for k in keys],
        dtype=torch.float64,
        device=_comm_device(ctx),
    )
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except RuntimeError as err:
        raise _collective_error("the all-reduce of the logged metrics", ctx, err) from err
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_state(module_or_state: nn.Module | dict[str, Tensor], ctx: DistContext, src: int = 0) -> Any:
    """Overwrite every tensor of a module's state dict (parameters and buffers), or of a dict of
    tensors, in place with rank `src`'s values; returns its argument. Call after building the model
    (and after rank 0 loaded a checkpoint) so every rank starts from identical weights. One broadcast
    per dtype (flat buffer)."""
    if not ctx.is_distributed:
        return module_or_state
    if isinstance(module_or_state, nn.Module):
        tensors = list(module_or_state.state_dict().values())  # detached views sharing storage
    elif isinstance(module_or_state, dict):
        tensors = [v for v in module_or_state.values() if isinstance(v, Tensor)]
    else:
        raise TypeError(
            f"broadcast_state takes an nn.Module or a dict of tensors, not {type(module_or_state)}"
        )
    dev = _comm_device(ctx)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        flat = torch.cat([t.detach().reshape(-1).to(dev) for t in group]) if group else None
        if flat is None or flat.numel() == 0:
            continue
        try:
            dist.broadcast(flat, src=src)
        except RuntimeError as err:
            raise _collective_error(f"the broadcast of the initial weights ({dtype})", ctx, err) from err
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view(t.shape).to(t.device))
                offset += n
    return module_or_state


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """Rank `src`'s picklable object on every rank (e.g. the checkpoint dict that only rank 0 read from
    the tracking store, the upstream run id, the resume step). Move tensors to CPU first. Pickle: only
    for objects from ranks of the same job, never from outside."""
    if not ctx.is_distributed:
        return obj
    box: list[Any] = [obj if ctx.rank == src else None]
    try:
        dist.broadcast_object_list(box, src=src, device=_comm_device(ctx))
    except RuntimeError as err:
        raise _collective_error("the broadcast of the resume state", ctx, err) from err
    return box[0]


def state_digest(module: nn.Module) -> str:
    """SHA-256 (16 hex) of a module's state dict bytes: equal on all ranks iff the weights are identical."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def assert_in_sync(module: nn.Module, ctx: DistContext, what: str = "weights") -> str:
    """Raise `DistributedError` unless every rank holds bit-identical weights (cheap: one gather of a
    digest). A safety net after the broadcast at start/resume and at checkpoints; returns the digest."""
    digest = state_digest(module)
    if not ctx.is_distributed:
        return digest
    got: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(got, digest)
    except RuntimeError as err:
        raise _collective_error(f"the {what} consistency check", ctx, err) from err
    if len(set(got)) != 1:
        raise DistributedError(
            f"the {what} differ between ranks (digests by rank: {got}); all ranks must start from the same "
            "broadcast state and apply the same averaged gradients"
        )
    return digest


# --------------------------------------------------------------------------------------------- other ranks
class FollowerRun(NullRun):
    """What a non-main rank's `execute` gets instead of the MLflow `StageRun`: a `RunLike` that logs nothing
    (only rank 0 talks to MLflow; pipeline/protocols.py), with a private scratch `outdir` that is never
    uploaded. Use it as a context manager: the `outdir` is removed on leaving it, as `stage_run` removes
    rank 0's. `own_artifact` finds nothing: the resume state comes from rank 0 via `broadcast_object`."""

    def __init__(self, stage: str, rank: int):
        super().__init__(Path(tempfile.mkdtemp(prefix=f"fewscan-{stage}-rank{rank}-")))
        self.stage = stage
        self.rank = rank

    def __enter__(self) -> FollowerRun:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.outdir, ignore_errors=True)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedError",
    "FollowerRun",
    "assert_in_sync",
    "average_gradients",
    "broadcast_object",
    "broadcast_state",
    "current",
    "init_from_env",
    "shard",
    "shard_bounds",
    "shard_weight",
    "state_digest",
    "timeout_from_env",
    "weighted_mean",
]
