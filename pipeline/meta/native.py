"""The compiled CPU kernels of the Conv-4 fast paths (`csrc/fastops.c`), built on first use.

Why a small C library and not a torch C++ extension: the kernels need no torch headers (they work on the
raw memory of contiguous tensors), so the system C compiler builds them in about a second instead of the
minute a `torch.utils.cpp_extension` build takes, and nothing has to be compiled at install time. They are
called through `ctypes`, which releases the GIL, so the engine's task threads run them in parallel.

The library is cached per source, compiler, flags and CPU under `$FEWSCAN_NATIVE_CACHE` (default
`~/.cache/fewscan/native`), written to a temporary name and renamed into place, so concurrent first uses
never see a half-written file. Where no compiler works (or `FEWSCAN_NATIVE=0`), `lib()` returns None and
every fast path keeps the pure-torch implementation it had before: correctness never depends on this
module. Speed does, and so does float rounding (the kernels sum in another order), which a long training
run can amplify; meta-train logs `status()` so runs can be compared on the same path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch._C import _functorch

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
    """'loaded', 'disabled by FEWSCAN_NATIVE=0' or 'unavailable: <why>' (after the first `lib()` call)."""
    lib()
    return str(_state["why"])


def build_id() -> str:
    """Which arithmetic the fast paths use, for stage fingerprints (pipeline/codeset.py): 'torch' when the
    kernels are not loaded (disabled or unavailable alike: the pure-torch paths), else 'native-<key>' with
    the key of the build (sources, compiler, flags, CPU features), which fixes the summation order."""
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
