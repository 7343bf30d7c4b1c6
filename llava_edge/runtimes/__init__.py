"""Pluggable runtimes behind one protocol: torch, onnx, llamacpp, tensorrt.

>>> from llava_edge.runtimes import open_runtime, Conversation
>>> rt = open_runtime("my-model", runtime="torch")
>>> chat = Conversation(rt)
>>> for piece in chat.send("What colour is the circle?", image="photo.png"):
...     print(piece, end="")
"""

from llava_edge.runtimes.base import Prompt, Runtime
from llava_edge.runtimes.chat import Conversation
from llava_edge.runtimes.registry import get_runtime_class, open_runtime, runtime_names
from llava_edge.runtimes.sampling import GenerationConfig

__all__ = ["Conversation", "GenerationConfig", "Prompt", "Runtime", "get_runtime_class",
           "open_runtime", "runtime_names"]
