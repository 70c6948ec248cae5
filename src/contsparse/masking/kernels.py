"""Fused CPU kernels for the soft mask (``csrc/soft_mask.cpp``), compiled on first use.

Why: on a CPU every elementwise pass over a weight-sized tensor costs about as much as a small
matmul, and eager PyTorch makes one pass per operation. One loop each way cuts a LeNet-300-100 search
step by about a tenth of a dense step (``benchmarks/overhead.py``). The kernels are compiled once
per machine and CPU capability with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) into
torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Where
that cannot be done the masks use PyTorch's operations, with the same results up to float rounding,
and one warning says why. ``CONTSPARSE_FUSED_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shlex
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

ENV_SWITCH = "CONTSPARSE_FUSED_KERNELS"
SOURCE = Path(__file__).with_name("csrc") / "soft_mask.cpp"
# Compiler flags per CPU capability, as ATen builds its own vectorized kernels
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
_PLAIN = (Tensor, torch.nn.Parameter)  # tensor subclasses (DTensor, ...) have their own dispatch
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ModuleType | str | None] = {"module": None, "failure": None}
_switched_off: list[bool] = []  # a stack: switched_off() nests


def enabled() -> bool:
    """Whether the user left the kernels on (``CONTSPARSE_FUSED_KERNELS`` unset, or not 0/false/no/off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Masks use PyTorch's operations while this block runs, in every thread of the process: for
    A/B timings (``benchmarks/overhead.py``) and for ruling the kernels out when a result looks
    wrong. Run the forward and the backward pass inside it (a node made before keeps its kind)."""
    _switched_off.append(True)
    try:
        yield
    finally:
        _switched_off.pop()


def load() -> ModuleType | None:
    """The compiled kernels, built on the first call in this process (about 20 s the first time on a
    machine, then a cache check); ``None`` when they are switched off or cannot be built."""
    if _switched_off:
        return None
    if _state["module"] is not None or _state["failure"] is not None or not enabled():
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if _state["module"] is None and _state["failure"] is None:
            try:
                _state["module"] = _build()
            except Exception as error:  # no compiler, no ninja, no OpenMP, unsupported platform, ...
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _state["failure"] = reason
                warnings.warn(f"contsparse's fused CPU mask kernels could not be built ({reason}); the masks use "
                              f"PyTorch operations instead (same results, slower search steps on CPU). "
                              f"{ENV_SWITCH}=0 skips the attempt.", RuntimeWarning, stacklevel=2)
    return _state["module"]  # type: ignore[return-value]


def failure() -> str | None:
    """Why the kernels could not be built in this process, if they could not."""
    return _state["failure"]  # type: ignore[return-value]


def compiled() -> bool:
    """Whether this machine's build is in place (loaded in this process, or in torch's extension
    cache), so that :func:`load` takes a moment, not a compilation."""
    if _state["module"] is not None:
        return True
    name = _extension_name()
    return any(folder.joinpath(name, f"{name}.so").exists() for folder in _cache_roots())


def applicable(*tensors: Tensor) -> bool:
    """Whether the kernels compute this call: contiguous float32 CPU tensors (the eager path takes
    the rest: other dtypes, devices and memory formats)."""
    for t in tensors:  # a loop, not all(...) over a generator: this runs per layer and step
        if not (t.is_cpu and t.dtype is torch.float32 and type(t) in _PLAIN and t.is_contiguous()
                and not t._is_zerotensor()):
            return False
    return True


def _build() -> ModuleType:
    from torch.utils import cpp_extension  # imports setuptools: only when the kernels are wanted

    _put_pip_ninja_on_path()
    compiler = (shlex.split(os.environ.get("CXX", "")) or ["c++"])[0]  # CXX may be "ccache g++"
    if shutil.which(compiler) is None and not compiled():  # a build in the cache loads without one
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    _log.info("compiling contsparse's fused CPU mask kernels (once per machine)")
    name = _extension_name()
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    with _exclusive(folder):
        # Built from a copy inside the cache folder: the build then names the same path from
        # every checkout and install of this version, so a second one loads instead of rebuilding
        source = folder / SOURCE.name
        if not source.exists() or source.read_text() != SOURCE.read_text():
            source.write_text(SOURCE.read_text())
        try:
            return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=_flags(), verbose=False)
        except Exception as error:
            raise RuntimeError(_cause(str(error))) from error


def _flags() -> list[str]:
    flags = ["-O3", *_CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")  # at::parallel_for's threads: torch's own OpenMP runtime, already loaded
    return flags


def _extension_name() -> str:
    """Named by CPU capability (a shared cache never hands one machine's instructions to another)
    and by a digest of the source, the flags and the torch install (its version and location: the
    build names its headers and libraries), so that two versions of contsparse, or two virtual
    environments, sharing a cache do not rebuild each other's kernels in turn."""
    capability = re.sub(r"\W+", "_", torch.backends.cpu.get_cpu_capability().lower())
    identity = [SOURCE.read_text(), *_flags(), torch.__version__, str(Path(torch.__file__).resolve().parent)]
    digest = hashlib.sha256("\0".join(identity).encode()).hexdigest()
    return f"contsparse_soft_mask_{capability}_{digest[:10]}"


def _cache_roots() -> list[Path]:
    """Where torch's extension cache keeps builds (it adds a folder per Python and CUDA version)."""
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    this_python = f"py{sys.version_info.major}{sys.version_info.minor}_*"  # not other Pythons' builds
    return [root, *root.glob(this_python)] if root.is_dir() else []


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One contsparse process at a time builds or loads into ``folder``. torch's own lock is a file
    that a killed process leaves behind, after which every later process waits for it forever; this
    one is an OS lock, released when its holder dies, so a ``lock`` file found while holding it is
    such a leftover and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "contsparse.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cause(message: str) -> str:
    """The line of a failed build that says why (the compiler's error, the shell's "not found"),
    not the command line ninja prints first."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    build_chatter = ("Error building extension", "[", "FAILED:", "ninja:")
    for line in lines:
        telling = re.search(r"error|not found|no such file|cannot", line, re.IGNORECASE)
        if telling and not line.startswith(build_chatter):
            return line[:300]
    return (lines[-1] if lines else "the build failed")[:300]


def _put_pip_ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the pip package's binary is not there when the virtual
    environment's scripts are run without activating it."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
