"""llava-edge: train a LLaVA model, export it to ONNX / GGUF / TensorRT, run it locally, measure drift.

Importing this package is cheap and never imports torch: desktop apps that only run a bundle
install numpy, Pillow, tokenizers and one runtime.
"""

__version__ = "0.1.0"

_API = ("load", "Assistant", "Chat")


def __getattr__(name):  # lazy: `import llava_edge` imports no numpy and no runtime
    if name in _API:
        from llava_edge import api

        return getattr(api, name)
    raise AttributeError(f"module 'llava_edge' has no attribute {name!r}")
