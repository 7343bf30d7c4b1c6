"""TensorRT: ONNX parts TensorRT's parser accepts (:mod:`.onnx_parts`), the operator check
(:mod:`.operators`) and the engine builder (:mod:`.builder`). See docs/tensorrt.md."""
