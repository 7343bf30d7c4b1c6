"""GGUF export for llama.cpp, Ollama and LM Studio: language model + mmproj, quantized by llama.cpp.

>>> from llava_edge.export.gguf import export_gguf
>>> export_gguf("my-model", "my-bundle", quant=["F16", "Q4_K_M"])

Modules: :mod:`.names` (the one table of names, keys and quant types), :mod:`.source` (checkpoint
facts, tensors read one at a time), :mod:`.writer` (streaming GGUF writer), :mod:`.quantize`
(llama.cpp's quantizer), :mod:`.check` (pre-flight checks of GGUF files), :mod:`.modelfile` (Ollama),
:mod:`.export` (the pipeline into a bundle). Importing this package imports neither torch nor
transformers.
"""

from llava_edge.export.gguf.export import add_gguf_components, export_gguf
from llava_edge.export.gguf.names import QUANT_TYPES
from llava_edge.export.gguf.quantize import quant_type, quantize_gguf

__all__ = ["QUANT_TYPES", "add_gguf_components", "export_gguf", "quant_type", "quantize_gguf"]
