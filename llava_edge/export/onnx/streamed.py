"""Export a decoder too large to load: trace it on the meta device, attach weights one at a time.

Tracing a 7B decoder with real weights needs the fp32 model in memory (28 GB) and then some. Here
the decoder is traced with ``torch.device("meta")`` parameters (no memory), without the exporter's
optimizer (it would read the weights). The graph's linear layers then come out as
``MatMul(x, Transpose(W))``; each ``W`` is read from the safetensors files, one tensor at a time, and
either quantized straight to an int4 ``MatMulNBits`` (onnxruntime's own block quantizer, so the
result is bit-identical to quantizing a traced fp32 file with ``MatMulNBitsQuantizer``) or stored
transposed (fp32). The rest of the weights (norms) are small. Peak memory is the int4 weights plus
the largest single fp32 matrix.

The vision tower, projector and embeddings are small enough to materialise and trace as usual:
:func:`load_parts` loads only their weights onto a meta-device model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llava_edge.errors import ModelError
from llava_edge.export.onnx.files import save_model
from llava_edge.export.onnx.specs import SPECS, TRACE_DIMS, ModelDims
from llava_edge.quant.onnx_quant import Int4Options

#: Checkpoint key prefixes (LLaVA's original layout, which transformers 5 still writes) -> the
#: parameter names of transformers 5's LlavaForConditionalGeneration. First match wins.
CHECKPOINT_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def model_key(checkpoint_key: str) -> str:
    for old, new in CHECKPOINT_PREFIXES:
        if checkpoint_key.startswith(old):
            return new + checkpoint_key[len(old):]
    return checkpoint_key  # already in the new layout


class CheckpointWeights:
    """The tensors of a checkpoint folder by model parameter name, read lazily, one at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._where: dict[str, tuple[Path, str]] = {}
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    self._where[model_key(key)] = (file, key)
        if not self._where:
            raise ModelError(f"{self.folder}: no .safetensors weights")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def torch(self, name: str):
        """One tensor, as a copy. The file is opened per call so that no mapping of the (many GB of)
        safetensors files outlives the call: resident memory stays that of the tensors in use."""
        from safetensors import safe_open

        if name not in self._where:
            raise ModelError(f"{self.folder}: the checkpoint has no weight for {name!r}")
        file, key = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key).clone()

    def numpy(self, name: str) -> np.ndarray:
        return self.torch(name).float().numpy()

    def load_module(self, module, prefix: str) -> None:
        """Materialise a meta-device ``module`` on the CPU (fp32) with its checkpoint weights."""
        import torch

        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(self.torch(prefix + name).float())
            for owner_name, owner in module.named_modules():
                for bname, buf in owner.named_buffers(recurse=False):
                    full = f"{prefix}{owner_name + '.' if owner_name else ''}{bname}"
                    if full in self:
                        buf.copy_(self.torch(full).float())
                    else:  # computed buffers (position ids, rotary frequencies): rebuild the owner
                        buf.copy_(_computed_buffer(owner, bname))


def _computed_buffer(owner, name: str):
    """A buffer that checkpoints do not store, recomputed by building its module again on the CPU."""
    import torch

    if hasattr(owner, "config") and "inv_freq" in name:  # rotary embeddings
        with torch.device("cpu"):
            return getattr(type(owner)(config=owner.config), name)
    if name == "position_ids":  # CLIP embeddings
        return torch.arange(owner.num_positions).expand((1, -1))
    raise ModelError(f"cannot compute buffer {name!r} of {type(owner).__name__}; it is not in the checkpoint")


def meta_model(model_dir: str | Path):
    """``LlavaForConditionalGeneration`` of a checkpoint folder with every tensor on the meta device."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return model.float().eval()


def load_parts(model, weights: CheckpointWeights) -> None:
    """Load the vision tower, projector and token embeddings of a meta model (not the decoder)."""
    weights.load_module(model.model.vision_tower, "model.vision_tower.")
    weights.load_module(model.model.multi_modal_projector, "model.multi_modal_projector.")
    weights.load_module(model.get_input_embeddings(), "model.language_model.embed_tokens.")


def check_streamable(precision: str, int4: Int4Options) -> None:
    if precision not in ("fp32", "int4"):
        raise ModelError(f"the streamed decoder export writes fp32 or int4, not {precision!r} "
                         "(fp16/int8 decoders need the traced export: streamed=False)")
    if precision == "int4" and int4.algorithm != "default":
        raise ModelError(f"the streamed decoder export quantizes with the 'default' int4 algorithm; "
                         f"{int4.algorithm!r} needs the whole fp32 graph (use the traced export)")


def export_decoder_streamed(model, weights: CheckpointWeights, path: str | Path, *, precision: str = "int4",
                            int4: Int4Options | None = None, opset: int = 20) -> list[Path]:
    """Trace the decoder of meta ``model``, attach ``weights`` (int4 or fp32), write ``path``."""
    import onnx_ir as ir
    import torch

    from llava_edge.export.onnx.export import ExportError, quiet

    int4 = int4 or Int4Options()
    check_streamable(precision, int4)
    spec, dims = SPECS["decoder"], ModelDims.from_config(model.config)
    module = spec.build(model).eval()
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    model_name = {n: names[id(t)] for n, t in [*module.named_parameters(), *module.named_buffers()]}
    inputs = spec.dummy_inputs(dims, TRACE_DIMS, np.random.default_rng(0))
    args = spec.args(inputs, dims)
    args = (*(a.to("meta") for a in args[:3]), tuple(a.to("meta") for a in args[3]))
    with quiet(), torch.no_grad():
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        input_names=spec.input_names(dims),
                                        output_names=spec.output_names(dims),
                                        dynamic_shapes=spec.dynamic_shapes(dims), optimize=False)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"decoder: torch.onnx could not trace the meta-device decoder: {exc}") from exc
    graph = program.model.graph
    n_linear = _attach_linear_weights(graph, model_name, weights, precision, int4)
    if precision == "int4":
        program.model.opset_imports["com.microsoft"] = 1
    # Drop the replaced Transpose(W) nodes first: their W would otherwise count as still in use.
    ir.passes.common.RemoveUnusedNodesPass()(program.model)
    _attach_other_weights(graph, model_name, weights, model)
    files = save_model(program.model, path)
    if n_linear == 0:
        raise ExportError("decoder: no linear layer found in the traced graph; the graph layout changed")
    return files


def _attach_linear_weights(graph, model_name: dict, weights: CheckpointWeights, precision: str,
                           int4: Int4Options) -> int:
    """Replace every ``MatMul(x, Transpose(W))`` whose W is a checkpoint weight."""
    import onnx_ir as ir

    quantizer = None
    if precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer,
        )

        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=int4.block_size, is_symmetric=int4.symmetric, accuracy_level=int4.accuracy_level,
            bits=4))
    count = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        transpose = node.inputs[1].producer()
        if transpose is None or transpose.op_type != "Transpose":
            continue
        w = transpose.inputs[0]
        if not w.is_initializer() or w.name not in model_name:
            continue
        matrix = weights.numpy(model_name[w.name])  # [N, K], torch Linear layout
        n_out, k_in = matrix.shape
        if quantizer is None:
            value = _initializer(graph, f"{w.name}.T", np.ascontiguousarray(matrix.T))
            node.replace_input_with(1, value)
        else:
            packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(matrix.T))
            ins = [node.inputs[0], _initializer(graph, f"{w.name}_Q4", packed),
                   _initializer(graph, f"{w.name}_scales", scales)]
            if not int4.symmetric:
                ins.append(_initializer(graph, f"{w.name}_zero_points", zero_points))
            attrs = {"K": k_in, "N": n_out, "bits": 4, "block_size": int4.block_size}
            if int4.accuracy_level:
                attrs["accuracy_level"] = int4.accuracy_level
            new = ir.node("MatMulNBits", ins, attrs, domain="com.microsoft", name=f"{node.name}_Q4")
            graph.insert_before(node, new)
            old = node.outputs[0]
            old_name, old.name = old.name, None  # the new output takes the name (it may be "logits")
            new.outputs[0].shape, new.outputs[0].type = old.shape, old.type
            old.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            new.outputs[0].name = old_name
            graph.remove(node, safe=True)
        del matrix
        count += 1
    return count


def _initializer(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    dtype = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=dtype, const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _attach_other_weights(graph, model_name: dict, weights: CheckpointWeights, model) -> None:
    """Fill the remaining (small) meta initializers: norms from the checkpoint, computed buffers."""
    import onnx_ir as ir
    import torch

    modules = dict(model.named_modules())
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.is_meta):
            continue
        if not value.uses():
            continue
        full = model_name.get(name)
        if full is None:
            raise ModelError(f"decoder: traced constant {name!r} has no value (it was created on the meta "
                             "device and is not a checkpoint weight)")
        if full in weights:
            array = weights.numpy(full)
        else:
            owner, _, bname = full.rpartition(".")
            array = _computed_buffer(modules[owner], bname).float().numpy()
        value.const_value = ir.Tensor(np.ascontiguousarray(array, dtype=np.float32), name=name)


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Size of the weights on disk (what decides between loading and streaming)."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        return int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0))
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
