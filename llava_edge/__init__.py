"""llava-edge: train a LLaVA model, export it to ONNX / GGUF / TensorRT, run it locally, measure drift.

Importing this package is cheap and never imports torch: desktop apps that only run a bundle
install numpy, Pillow, tokenizers and one runtime.
"""

__version__ = "0.1.0"
