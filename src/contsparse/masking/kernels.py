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

import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

ENV_SWITCH = "CONTSPARSE_FUSED_KERNELS"
SOURCE = Path(__file__).with_name("csrc") / "soft_mask.cpp"
# Compiler flags per CPU capability as ATen builds its own vectorized kernels: the extension is
# named by capability, so a shared cache never hands one machine's instructions to another.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
_PLAIN = (Tensor, torch.nn.Parameter)  # tensor subclasses (DTensor, ...) have their own dispatch
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ModuleType | str | None] = {"module": None, "failure": None}


def enabled() -> bool:
    """Whether the user left the kernels on (``CONTSPARSE_FUSED_KERNELS`` unset, or not 0/false/no/off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def load() -> ModuleType | None:
    """The compiled kernels, built on the first call in this process (about 20 s the first time on a
    machine, then a cache check); ``None`` when they are switched off or cannot be built."""
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
    try:
        from torch.utils import cpp_extension

        name = _extension_name()
        return (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch's: when it moves, assume a compilation is ahead
        return False


def applicable(*tensors: Tensor) -> bool:
    """Whether the kernels compute this call: contiguous float32 CPU tensors (the eager path takes
    the rest: other dtypes, devices and memory formats)."""
    for t in tensors:  # noqa: SIM110 (a loop, not all(...) over a generator: this runs per layer and step)
        if not (t.is_cpu and t.dtype is torch.float32 and type(t) in _PLAIN and t.is_contiguous()):
            return False
    return True


def _build() -> ModuleType:
    from torch.utils import cpp_extension  # imports setuptools: only when the kernels are wanted

    _put_pip_ninja_on_path()
    flags = ["-O3", *_CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")  # at::parallel_for's threads: torch's own OpenMP runtime, already loaded
    _log.info("compiling contsparse's fused CPU mask kernels (once per machine)")
    return cpp_extension.load(name=_extension_name(), sources=[str(SOURCE)], extra_cflags=flags, verbose=False)


def _extension_name() -> str:
    return f"contsparse_soft_mask_{torch.backends.cpu.get_cpu_capability().lower()}"


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
