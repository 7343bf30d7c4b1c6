"""Plumbing shared by everything that calls llama.cpp (the quantizer and the ``llamacpp`` runtime).

llama.cpp logs to stderr by default, and its errors are only in that log (functions return a code or
NULL). :func:`llama_logs` routes llama.cpp's and mtmd's log into a ring buffer once per process and
yields a handle whose :meth:`~_Capture.last_error` quotes what went wrong, for our error messages.
Set ``LLAVA_EDGE_LLAMACPP_VERBOSE=1`` to see the log as well. The callback is process-wide: other
users of llama-cpp-python in the same process see their log captured too.

:func:`model_params` is how every model we load is loaded: llama.cpp's defaults, less the extra
weight buffers on CPUs with Intel AMX, where llama.cpp's AMX kernels crash (:func:`cpu_has_amx`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator

_WARN, _ERROR = 2, 3  # ggml_log_level


class _LogBuffer:
    def __init__(self, maxlen: int = 400):
        self.lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=maxlen)
        self.count = 0
        self.lock = threading.Lock()
        self.verbose = bool(os.environ.get("LLAVA_EDGE_LLAMACPP_VERBOSE"))

    def add(self, level: int, text: str) -> None:
        with self.lock:
            self.lines.append((level, text))
            self.count += 1
        if self.verbose:
            print(text, end="", flush=True)

    def since(self, start: int) -> list[tuple[int, str]]:
        with self.lock:
            n = min(self.count - start, len(self.lines))
            return list(self.lines)[len(self.lines) - n:] if n > 0 else []


_LOG = _LogBuffer()
_callback = None  # the ctypes callback object; kept alive for the life of the process


class _Capture:
    def __init__(self):
        self.start = _LOG.count

    def text(self) -> str:
        return "".join(t for _, t in _LOG.since(self.start))

    def last_error(self) -> str:
        """The last few warning/error lines llama.cpp logged since the capture started."""
        lines = [t.strip() for level, t in _LOG.since(self.start) if level in (_WARN, _ERROR)]
        return " | ".join(x for x in lines[-4:] if x)


def _install() -> None:
    global _callback
    import llama_cpp
    from llama_cpp import mtmd_cpp

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):  # noqa: ARG001 - the C signature
        _LOG.add(int(level), text.decode("utf-8", errors="replace") if text else "")

    _callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


@contextlib.contextmanager
def llama_logs() -> Iterator[_Capture]:
    """Capture what llama.cpp logs inside the ``with`` block (installing the capture on first use)."""
    if _callback is None:
        _install()
    yield _Capture()


@functools.cache
def cpu_has_amx() -> bool:
    """Whether the CPU reports Intel AMX (Linux's ``amx_int8`` flag in /proc/cpuinfo).

    llama-cpp-python 0.3.36 built on such a CPU (GGML_NATIVE, its default) keeps quantized weights in
    ggml's AMX buffers, and ``ggml_backend_amx_mul_mat`` then kills the process with SIGSEGV in the
    first ``llama_decode`` (seen on an Intel Xeon with amx_int8, on our Q8_0 bundles: gdb's backtrace
    ends in ggml::cpu::amx::tensor_traits::compute_forward). Without the extra buffer types the
    same weights run through llama.cpp's ordinary CPU kernels. Read once per process."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
    except OSError:
        return False


def model_params(default=None):
    """``llama_model_default_params()`` (or ``default()``) with the extra weight buffers (AMX,
    repacking) off where the CPU has AMX (:func:`cpu_has_amx`); elsewhere llama.cpp's defaults."""
    import llama_cpp

    params = (default or llama_cpp.llama_model_default_params)()
    params.use_extra_bufts = not cpu_has_amx()
    return params


@contextlib.contextmanager
def our_model_params() -> Iterator[None]:
    """Within: code that starts from ``llama_model_default_params()`` (llama-cpp-python's ``Llama``,
    which has no argument for extra buffers) gets :func:`model_params` instead."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params
    low.llama_model_default_params = lambda: model_params(default)
    try:
        yield
    finally:
        low.llama_model_default_params = default
