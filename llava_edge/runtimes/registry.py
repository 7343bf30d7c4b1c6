"""Runtime backends by name, from the ``llava_edge.runtimes`` entry-point group.

Third parties add a backend by declaring, in their own package::

    [project.entry-points."llava_edge.runtimes"]
    mybackend = "my_pkg.runtime:MyRuntime"

Our own backends are also listed here so a source checkout works before ``pip install``.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points

from llava_edge.errors import RuntimeNotAvailable

GROUP = "llava_edge.runtimes"
BUILTIN = {
    "torch": ("llava_edge.runtimes.torch_runtime:TorchRuntime", "pip install 'llava-edge[torch]'"),
    "onnx": ("llava_edge.runtimes.onnx_runtime:OnnxRuntime", "pip install 'llava-edge[onnx]'"),
    "llamacpp": ("llava_edge.runtimes.llamacpp_runtime:LlamaCppRuntime", "pip install 'llava-edge[gguf]'"),
    "tensorrt": ("llava_edge.runtimes.tensorrt_runtime:TensorRTRuntime",
                 "TensorRT from NVIDIA (pip install tensorrt) and torch with CUDA, on an NVIDIA GPU; docs/tensorrt.md"),
}


def runtime_names() -> list[str]:
    names = set(BUILTIN)
    names.update(ep.name for ep in entry_points(group=GROUP))
    return sorted(names)


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_runtime_class(name: str):
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    target, hint = BUILTIN.get(name, (None, None))
    if name in eps:
        target = eps[name].value
    if target is None:
        raise RuntimeNotAvailable(f"unknown runtime {name!r}; available: {', '.join(runtime_names())}")
    try:
        return _load(target)
    except ImportError as exc:
        raise RuntimeNotAvailable(
            f"runtime {name!r} cannot be used: {exc.name or exc} is not installed"
            + (f" ({hint})" if hint else "")
        ) from None


def runtime_options(cls) -> list[str]:
    """The keyword options a backend's ``open`` accepts."""
    params = inspect.signature(cls.open).parameters.values()
    names = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    if any(p.kind is p.VAR_KEYWORD for p in params):  # passed on to Runtime.__init__
        names.append("image_cache_size")
    return names


def open_runtime(path, runtime: str = "torch", **options):
    """Load ``path`` (a model folder or a bundle) on the named backend."""
    cls = get_runtime_class(runtime)
    known = runtime_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RuntimeNotAvailable(f"runtime {runtime!r} has no option {', '.join(map(repr, unknown))}; "
                                  f"it takes: {', '.join(known) or 'none'}")
    return cls.open(path, **options)
