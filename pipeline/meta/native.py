"""The compiled CPU kernels of the Conv-4 fast paths (`csrc/fastops.c`), built on first use.

Why a small C library and not a torch C++ extension: the kernels need no torch headers (they work on the
raw memory of contiguous tensors), so the system C compiler builds them in about a second instead of the
minute a `torch.utils.cpp_extension` build takes, and nothing has to be compiled at install time. They are
called through `ctypes`, which releases the GIL, so the engine's task threads run them in parallel.

The library is cached per source, compiler, flags and CPU under `$FEWSCAN_NATIVE_CACHE` (default
`~/.cache/fewscan/native`). The first build holds an exclusive `flock` on a lock file beside the cache
entry, so processes that start together (torchrun ranks, CI workers) compile it once and wait for it; it is
written to a temporary name and renamed into place, so no process ever loads a half-written file.

Safe by construction: once loaded, every kernel is checked against the stock PyTorch ops on a small
problem, on this CPU with this compiler's code (`_self_check`: forward, backward, and the double backward
used under `create_graph`, float32 and float64; a few ms per process). The kernels are used only if all
agree; otherwise one warning line says which disagreed and every fast path keeps its pure-torch
implementation, as where no compiler works (or `FEWSCAN_NATIVE=0`): `lib()` returns None, and correctness
never depends on this module. Speed does, and so does float rounding (the kernels sum in another order),
which a long training run can amplify; meta-train logs `status()` so runs can be compared on the same path
(README, Development, "CPU kernels").
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _functorch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked (the rename below still protects readers)
    fcntl = None  # type: ignore[assignment]

_SRC = Path(__file__).with_name("csrc")
_SOURCES = ("fastops.c", "fastops_impl.h", "pool_avx512.h")
# Files besides this one whose edits change results: they enter the code set of every stage that reaches
# this module, hence its fingerprint (pipeline/codeset.py, read with ast: keep it a literal list).
CODE_DEPENDENCIES = ["csrc/*.c", "csrc/*.h"]
# -O3; no -ffast-math: IEEE semantics (NaN handling, no reassociation) are
# part of "exact". -fopenmp-simd only honours the `omp simd` reduction pragmas (no OpenMP runtime).
_FLAGS = ("-O3", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11")
# The host's vector units by default; FEWSCAN_NATIVE_ARCH overrides it (e.g. "-march=x86-64-v3" for a
# cache shared by different machines, or "-march=x86-64" to test the portable kernels on an AVX-512 host).
_DEFAULT_ARCH = "-march=native"
_ABI = 1

_lock = threading.Lock()
_state: dict[str, object] = {}
# Test hook: called with (kernel name, e.g. "gn_double_backward_f32", {output name: tensor}) on each kernel
# result of the self-check before it is compared, so a test can corrupt one and see the kernels refused.
_self_check_hook: Callable[[str, dict[str, Tensor]], None] | None = None


def _cpu_key() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    env = os.environ.get("FEWSCAN_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fewscan" / "native"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` (created if missing) while the block runs: concurrent first uses in
    several processes build the library once, the others wait and load it. Where no lock can be had (a
    read-only shared cache, a filesystem without locks) the block runs unlocked: the rename in `_compile`
    still keeps every reader off partial files, only the compile may run more than once."""
    fd = -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _compile(cc: str, flags: list[str], out: Path) -> None:
    """Compile into a temporary file next to `out`, then rename: a reader never sees a partial library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, "-o", tmp, str(_SRC / "fastops.c")], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {proc.stderr.strip()[-800:]}")
        # not pipeline/atomic.py: the compiler writes the file itself (by name, not through a file object),
        # so the rename of its finished output is all that is left to do; the flock in `_file_lock` keeps
        # concurrent builds from racing (docs/ARCHITECTURE.md principle 12)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    flags = [*_FLAGS, *os.environ.get("FEWSCAN_NATIVE_ARCH", _DEFAULT_ARCH).split()]
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_SRC / name).read_bytes())
    h.update("\0".join((cc, *flags, _cpu_key(), platform.machine())).encode())
    _state["build"] = h.hexdigest()[:16]
    out = _cache_dir() / f"libfewscan_fastops-{_state['build']}.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.with_name(out.name + ".lock")):  # check, build and load as one step
        if not out.exists():
            _compile(cc, flags, out)
        try:
            lib = ctypes.CDLL(str(out))
        except OSError:  # a damaged cache entry (e.g. a disk that filled up): build it once more
            out.unlink(missing_ok=True)
            _compile(cc, flags, out)
            lib = ctypes.CDLL(str(out))
    if lib.fewscan_fastops_abi() != _ABI:
        raise RuntimeError(f"{out} has another ABI version; delete it to rebuild")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suf in ("f32", "f64"):
        for name in ("pool2_relu_fwd", "pool2_relu_bwd", "pool2_relu_gather"):
            getattr(lib, f"{name}_{suf}").argtypes = [i64, i64, i64, ptr, ptr, ptr]
        getattr(lib, f"gn_double_backward_{suf}").argtypes = [i64] * 4 + [ptr] * 11
        fwd, bwd = getattr(lib, f"gn_pool_relu_fwd_{suf}"), getattr(lib, f"gn_pool_relu_bwd_{suf}")
        fwd.argtypes = [i64] * 5 + [ctypes.c_double] + [ptr] * 7
        bwd.argtypes = [i64] * 5 + [ptr] * 9
        fwd.restype = bwd.restype = ctypes.c_int  # 0, or -1 when the scratch buffer cannot be allocated
    return lib


# ------------------------------------------------------------------------------------------- self-check
# Why: what the kernels compute depends on this compiler's code for this CPU (`-march`, the vector units,
# the compiler's floating-point defaults; some compilers reassociate or drop NaN semantics by default),
# which no test run elsewhere can vouch for. So each process checks the library it loaded before using
# it, against the stock ops on a small problem covering every kernel and branch the fast paths call:
# - the pool kernels (forward, backward, double-backward gather) select and copy, no arithmetic: they must
#   equal ATen bit for bit, on ties, zeros, NaN, ±inf and -0, odd sizes and rows longer than one SIMD step;
# - the GroupNorm kernels sum in another order: each output may differ from the stock op's, relative to
#   the output's largest magnitude, by at most _TOL_FACTOR · M · eps(dtype), M the number of elements per
#   group. M · eps is the classic bound on the rounding error of a sum of M terms (recursive summation);
#   the factor covers the handful of sums chained in the double backward. Measured errors use at most
#   1/200 of it (x86-64 and AVX-512 builds, float32 and float64); a wrong kernel misses by far more, and
#   a float64 kernel that accumulated in float32 would miss it too.
# The GroupNorm problem is built so that no output sits within rounding of a pooling tie or of the ReLU's
# zero (see _gn_problem): there, rounding alone could route a gradient elsewhere and fail a correct build.
# The references differentiate sums such as (y·gy).sum() instead of passing grad_outputs: the same numbers
# (the product's backward multiplies by one), and torch.autograd.grad imports sympy on its first call with
# grad_outputs (about a second per process, which training itself never pays).
_TOL_FACTOR = 4
# odd height and width (the floor pool drops a row and a column), 17 outputs a row (> one 16-lane step)
_POOL_SHAPE = (2, 3, 7, 35)
_GN_SHAPE, _GN_GROUPS = (2, 4, 7, 35), 2  # M = 2·7·35 = 490 elements per group (even: see _gn_problem)
_GN_EPS = 1e-5


def _compare(name: str, got: dict[str, Tensor], want: dict[str, Tensor], tol: float) -> str | None:
    """None if every output in `got` matches `want` (exactly where `tol` is 0), else one line saying which."""
    if _self_check_hook is not None:
        _self_check_hook(name, got)
    for key, w in want.items():
        a = got[key]
        if tol == 0:
            nan = w.isnan()
            if torch.equal(a.isnan(), nan) and torch.equal(a.masked_fill(nan, 0), w.masked_fill(nan, 0)):
                continue
            return f"{name} {key} is not the stock op's, which it must equal exactly"
        err = ((a.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
        if not err <= tol:  # NaN fails too
            return f"{name} {key} is off by {err:.1e} relative to the stock op (tolerance {tol:.1e})"
    return None


def _pool_problem(dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """Integer values (ties and zeros in most windows) in one half of the planes, Gaussian in the other,
    and NaN, ±inf and -0 scattered over both."""
    x = torch.randint(-2, 3, _POOL_SHAPE, generator=g).to(dtype)
    x[:, 1:] = torch.randn(x[:, 1:].shape, generator=g, dtype=dtype)
    flat = x.view(-1)
    flat[::29], flat[3::31], flat[5::37], flat[7::41] = float("nan"), float("-inf"), float("inf"), -0.0
    return x


def _check_pool(lib: ctypes.CDLL, suf: str, dtype: torch.dtype, g: torch.Generator) -> str | None:
    x = _pool_problem(dtype, g)
    n, c, h, w = x.shape
    xr = x.clone().requires_grad_(True)
    yr = F.max_pool2d(F.relu(xr), 2)
    gy = torch.randn(yr.shape, generator=g, dtype=dtype).requires_grad_(True)
    (gxr,) = torch.autograd.grad((yr * gy).sum(), xr, create_graph=True)
    ggx = torch.randn(x.shape, generator=g, dtype=dtype)
    (ggyr,) = torch.autograd.grad((gxr * ggx).sum(), gy)
    gy = gy.detach()

    y, code = torch.empty_like(yr.detach()), torch.empty(yr.shape, dtype=torch.uint8)
    getattr(lib, f"pool2_relu_fwd_{suf}")(n * c, h, w, x.data_ptr(), y.data_ptr(), code.data_ptr())
    gx, ggy = torch.empty_like(x), torch.empty_like(y)
    getattr(lib, f"pool2_relu_bwd_{suf}")(n * c, h, w, gy.data_ptr(), code.data_ptr(), gx.data_ptr())
    getattr(lib, f"pool2_relu_gather_{suf}")(n * c, h, w, ggx.data_ptr(), code.data_ptr(), ggy.data_ptr())
    return (
        _compare(f"pool2_relu_fwd_{suf}", {"y": y}, {"y": yr.detach()}, 0)
        or _compare(f"pool2_relu_bwd_{suf}", {"gx": gx}, {"gx": gxr.detach()}, 0)
        or _compare(f"pool2_relu_gather_{suf}", {"ggy": ggy}, {"ggy": ggyr}, 0)
    )


def _gn_problem(dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x, weight, bias) whose GroupNorm outputs keep clear of pooling ties and of the ReLU's zero.

    Each (sample, group) holds the M half-integers v = -(M-1)/2 .. (M-1)/2 (M even), shuffled, scaled and
    shifted: the group's mean is the shift and x̂ = v/σ(v), up to eps and rounding (for any scale). With
    bias_c = weight_c · K_c/σ(v), K_c an integer, the output weight_c·(v + K_c)/σ(v) is a half-integer
    multiple of |weight_c|/σ(v): at least half that from zero and a whole one from any other value."""
    n, c, h, w = _GN_SHAPE
    d, m = c // _GN_GROUPS, (c // _GN_GROUPS) * h * w
    assert m % 2 == 0
    v = torch.arange(m, dtype=torch.float64) - (m - 1) / 2
    blocks = [
        v[torch.randperm(m, generator=g)] * (0.5 + 1.5 * torch.rand((), generator=g, dtype=torch.float64))
        + 3 * torch.randn((), generator=g, dtype=torch.float64)
        for _ in range(n * _GN_GROUPS)
    ]
    x = torch.stack(blocks).reshape(n, _GN_GROUPS, d, h, w).reshape(n, c, h, w)
    sign = torch.randint(0, 2, (c,), generator=g).double() * 2 - 1
    weight = sign * (0.5 + torch.rand(c, generator=g, dtype=torch.float64))
    k = torch.randint(-3, 4, (c,), generator=g).double()
    bias = weight * k / (v.pow(2).mean() + _GN_EPS).sqrt()
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def _check_gn_pool(lib: ctypes.CDLL, suf: str, dtype: torch.dtype, g: torch.Generator) -> str | None:
    """gn_pool_relu_fwd / _bwd against GroupNorm -> ReLU -> max-pool (values, statistics, gradients)."""
    x, weight, bias = _gn_problem(dtype, g)
    n, c, h, w = x.shape
    groups, tol = _GN_GROUPS, _TOL_FACTOR * (c // _GN_GROUPS) * h * w * torch.finfo(dtype).eps
    _, mean_r, rstd_r = torch.native_group_norm(x, weight, bias, n, c, h * w, groups, _GN_EPS)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    yr = F.max_pool2d(F.relu(F.group_norm(xr, groups, wr, br, _GN_EPS)), 2)
    gy = torch.randn(yr.shape, generator=g, dtype=dtype)
    gxr, gwr, gbr = torch.autograd.grad((yr * gy).sum(), (xr, wr, br))

    y, code = torch.empty_like(yr.detach()), torch.empty(yr.shape, dtype=torch.uint8)
    mean, rstd = x.new_empty(n, groups), x.new_empty(n, groups)
    fwd_args = (x, weight, bias, y, code, mean, rstd)
    if getattr(lib, f"gn_pool_relu_fwd_{suf}")(
        n, c, groups, h, w, _GN_EPS, *(t.data_ptr() for t in fwd_args)
    ):
        return f"gn_pool_relu_fwd_{suf} could not allocate its scratch plane"
    gx, gw, gb = torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(weight)
    bwd_args = (gy, code, x, mean, rstd, weight, gx, gw, gb)
    if getattr(lib, f"gn_pool_relu_bwd_{suf}")(n, c, groups, h, w, *(t.data_ptr() for t in bwd_args)):
        return f"gn_pool_relu_bwd_{suf} could not allocate its scratch block"
    return _compare(
        f"gn_pool_relu_fwd_{suf}",
        {"y": y, "mean": mean, "rstd": rstd},
        {"y": yr.detach(), "mean": mean_r, "rstd": rstd_r},
        tol,
    ) or _compare(
        f"gn_pool_relu_bwd_{suf}", {"gx": gx, "gw": gw, "gb": gb}, {"gx": gxr, "gw": gwr, "gb": gbr}, tol
    )


def _check_gn_double_backward(
    lib: ctypes.CDLL, suf: str, dtype: torch.dtype, g: torch.Generator
) -> str | None:
    """gn_double_backward against autograd through the stock GroupNorm backward, for each branch the
    kernel takes: all three incoming directions, no ggx (None), and no gx output wanted."""
    n, c, h, w = _GN_SHAPE
    groups, tol = _GN_GROUPS, _TOL_FACTOR * (c // _GN_GROUPS) * h * w * torch.finfo(dtype).eps
    x, weight, bias = (torch.randn(s, generator=g, dtype=dtype) for s in (_GN_SHAPE, (c,), (c,)))
    gy = torch.randn(_GN_SHAPE, generator=g, dtype=dtype)
    e, delta, b = (torch.randn(s, generator=g, dtype=dtype) for s in (_GN_SHAPE, (c,), (c,)))
    _, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, groups, _GN_EPS)
    xr, wr, br, gyr = (t.clone().requires_grad_(True) for t in (x, weight, bias, gy))
    yr = F.group_norm(xr, groups, wr, br, _GN_EPS)
    gxr, gwr, gbr = torch.autograd.grad((yr * gyr).sum(), (xr, wr, br), create_graph=True)
    kernel = getattr(lib, f"gn_double_backward_{suf}")
    for e_in, want_x in ((e, True), (None, True), (e, False)):
        total = (gwr * delta).sum() + (gbr * b).sum() + ((gxr * e_in).sum() if e_in is not None else 0)
        grads = torch.autograd.grad(total, (gyr, xr, wr), retain_graph=True, allow_unused=True)
        want = {
            k: torch.zeros_like(t) if a is None else a
            for k, a, t in zip(("ggy", "gx", "gw"), grads, (gy, x, weight))
        }
        got = {"ggy": torch.empty_like(gy), "gw": torch.zeros_like(weight)}
        if want_x:
            got["gx"] = torch.empty_like(x)
        else:
            del want["gx"]
        ins = (gy, x, mean, rstd, weight, e_in, delta, b, got["ggy"], got.get("gx"), got["gw"])
        kernel(n, c, groups, h * w, *(None if t is None else t.data_ptr() for t in ins))
        why = _compare(f"gn_double_backward_{suf}", got, want, tol)
        if why:
            return why
    return None


def _check_kernels(lib: ctypes.CDLL) -> str | None:
    # its own generator: the check must not move the global RNG (a run's draws would depend on when the
    # kernels were first touched)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        suf = "f32" if dtype == torch.float32 else "f64"
        for check in (_check_pool, _check_gn_pool, _check_gn_double_backward):
            why = check(lib, suf, dtype, g)
            if why:
                return why
    return None


def _self_check(lib: ctypes.CDLL) -> str | None:
    """None when every kernel agrees with the stock ops (see above), else one line saying which did not.

    Runs in a fresh thread: grad mode, inference mode and torch.func transforms are thread-local, so the
    check sees none of the caller's (the first use may come from inside `torch.no_grad()` or a backward)."""
    result: list[str | None] = []

    def run() -> None:
        try:
            result.append(_check_kernels(lib))
        except Exception as e:  # a crash of the check is a failed check
            result.append(f"the check raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    t = threading.Thread(target=run, name="fewscan-kernel-self-check")
    t.start()
    t.join()
    return result[0] if result else "the check did not finish"


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None where it cannot be built (see status)."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            loaded: ctypes.CDLL | None = None
            if os.environ.get("FEWSCAN_NATIVE", "1") == "0":
                _state["why"] = "disabled by FEWSCAN_NATIVE=0"
            else:
                try:
                    loaded = _build()
                    failed = _self_check(loaded)
                    if failed:
                        loaded = None
                        _state["why"] = f"failed self-check: {failed}"
                        warnings.warn(
                            f"fewscan: the compiled CPU kernels disagree with the stock PyTorch ops on this "
                            f"CPU ({failed}); using the pure-torch paths.",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    else:
                        _state["why"] = "loaded"
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _state["why"] = f"unavailable: {e}"
                    warnings.warn(
                        f"fewscan: the compiled CPU kernels could not be built ({e}); using the pure-torch "
                        f"paths (the same function up to float rounding, slower). Set FEWSCAN_NATIVE=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _state["lib"] = loaded
    return _state["lib"]  # type: ignore[return-value]


def pool_simd() -> bool:
    """True when the float32 pool kernels are the AVX-512 ones (faster than ATen's); the portable C
    versions are exact but slower on short rows, so float32 then keeps the torch path."""
    loaded = lib()
    return bool(loaded is not None and loaded.fewscan_pool_simd())


def status() -> str:
    """'loaded', 'disabled by FEWSCAN_NATIVE=0', 'unavailable: <why>' (no compiler, a failed build) or
    'failed self-check: <which kernel, by how much>' (built, but refused: see `_self_check`)."""
    lib()
    return str(_state["why"])


def build_id() -> str:
    """Which arithmetic the fast paths use, for stage fingerprints (pipeline/codeset.py): 'torch' when the
    kernels are not in use (disabled, unavailable or refused by the self-check alike: the pure-torch
    paths), else 'native-<key>' with the key of the build (sources, compiler, flags, CPU features), which
    fixes the summation order."""
    return f"native-{_state.get('build', 'unknown')}" if lib() is not None else "torch"


def usable(*tensors: Tensor) -> bool:
    """True when the kernels are built and every tensor is a contiguous float32/float64 CPU tensor of one
    dtype (the kernels read raw memory)."""
    dt = tensors[0].dtype
    if dt not in (torch.float32, torch.float64):
        return False
    for t in tensors:
        if (
            _functorch.is_functorch_wrapped_tensor(t)  # no raw memory behind a transform's wrapper
            or t.device.type != "cpu"
            or t.dtype != dt
            or not t.is_contiguous()
        ):
            return False
    return lib() is not None


def fn(name: str, dtype: torch.dtype):
    """The kernel `name` for `dtype` (float32 / float64)."""
    return getattr(lib(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
