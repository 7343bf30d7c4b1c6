"""Export pipelines: split a LLaVA model into parts and write ONNX, GGUF and TensorRT files."""
