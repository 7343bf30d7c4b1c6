"""The ``onnx`` runtime: same tokens as the torch runtime, no torch needed, clear errors on bad bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llava_edge.errors import ImageError, ModelError, RuntimeNotAvailable
from llava_edge.export.bundle import sha256_file
from llava_edge.runtimes import Conversation, GenerationConfig, Prompt, open_runtime
from llava_edge.runtimes.onnx_runtime import OnnxRuntime

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

GREEDY_32 = GenerationConfig(max_new_tokens=32)


@pytest.fixture(scope="session")
def fp32_bundle(onnx_bundle):
    return onnx_bundle()


@pytest.fixture(scope="session")
def torch_rt(tiny_model_dir):
    from llava_edge.runtimes.torch_runtime import TorchRuntime

    return TorchRuntime.open(tiny_model_dir)


@pytest.fixture
def onnx_rt(fp32_bundle):
    return OnnxRuntime.open(fp32_bundle)


def _chat(runtime, test_image, other_image) -> list[str]:
    chat = Conversation(runtime)
    return [chat.ask("What is in the picture?", image=test_image, config=GREEDY_32),
            chat.ask("And in this one?", image=other_image, config=GREEDY_32),
            chat.ask("Tell me more.", config=GREEDY_32)]


def test_greedy_32_tokens_equal_the_torch_runtime(torch_rt, onnx_rt, test_image):
    prompt_ids = [torch_rt.tokenizer.bos_id] + [4] * 16 + torch_rt.tokenizer.encode("USER: hi ASSISTANT:")
    tokens = {}
    for rt in (torch_rt, onnx_rt):
        rt.reset()
        prompt = Prompt(np.array(prompt_ids), [rt.encode_image(test_image)])
        tokens[rt.name] = list(rt.generate(prompt, GREEDY_32))
    assert len(tokens["torch"]) == 32, "this random model does not emit </s> early: all 32 are compared"
    assert tokens["onnx"] == tokens["torch"]


def test_multi_turn_chat_equals_torch_and_reuses_the_kv_prefix(torch_rt, onnx_rt, test_image, other_image):
    torch_rt.reset()
    assert _chat(onnx_rt, test_image, other_image) == _chat(torch_rt, test_image, other_image)
    assert onnx_rt.stats["image_encodes"] == 2  # each image once
    assert onnx_rt.stats["reused_tokens"] > onnx_rt.stats["prefill_tokens"] / 2


def test_encode_image_and_teacher_forced_logits_match_torch(torch_rt, onnx_rt, test_image):
    # fp32: same arithmetic in another order; the bar is 1e-4 max abs.
    embeds = onnx_rt.encode_image(test_image)
    assert embeds.shape == (16, 64)
    assert np.abs(embeds - torch_rt.encode_image(test_image)).max() <= 1e-4
    ids = [1] + [4] * 16 + onnx_rt.tokenizer.encode("USER: what colour? ASSISTANT: red")
    prompt = Prompt(np.array(ids), [embeds])
    assert np.abs(onnx_rt.logits(prompt) - torch_rt.logits(prompt)).max() <= 1e-4


def test_prefix_reuse_after_divergence_gives_fresh_prefill_logits(onnx_rt):
    """A cached prefix cropped to a shorter one must give what a fresh prefill gives."""
    tok = onnx_rt.tokenizer
    first = Prompt(np.array([1] + tok.encode("USER: one two three ASSISTANT:")))
    second = Prompt(np.array([1] + tok.encode("USER: one two four ASSISTANT:")))
    list(onnx_rt.generate(first, GenerationConfig(max_new_tokens=4)))
    reused = onnx_rt._prefill(second, 5)
    onnx_rt.reset()
    fresh = onnx_rt._prefill(second, 0)
    assert np.abs(reused - fresh).max() <= 1e-5


def test_registry_opens_the_onnx_runtime(fp32_bundle):
    assert isinstance(open_runtime(fp32_bundle, runtime="onnx"), OnnxRuntime)


TORCH_FREE = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
    from PIL import Image
    import numpy as np
    from llava_edge.runtimes import Conversation, GenerationConfig, open_runtime
    rt = open_runtime(sys.argv[1], runtime="onnx")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8))
    reply = Conversation(rt).ask("What is it?", image=image, config=GenerationConfig(max_new_tokens=8))
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"reply": reply, "leaked": leaked}))
""")


def test_runs_where_torch_and_transformers_cannot_be_imported(fp32_bundle, torch_rt):
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, str(fp32_bundle)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8))
    torch_rt.reset()
    assert result["reply"] == Conversation(torch_rt).ask("What is it?", image=image,
                                                          config=GenerationConfig(max_new_tokens=8))


# --- bad input: a clear error, never a crash inside onnxruntime --------------------------------------


@pytest.fixture
def bundle_copy(fp32_bundle, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, dest)
    return dest


def _rewrite_manifest(bundle, key, **fields):
    """Make the manifest agree with a damaged file, so the damage reaches the ONNX loader."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    comp = data["components"][key]
    comp.update(fields)
    path.write_text(json.dumps(data))


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_onnx_file(bundle_copy):
    (bundle_copy / "onnx/decoder.onnx").unlink()
    with pytest.raises(ModelError, match=r"'onnx/decoder' is missing its file onnx/decoder.onnx"):
        OnnxRuntime.open(bundle_copy)


def test_missing_external_data_file(bundle_copy):
    (bundle_copy / "onnx/vision.onnx.data").unlink()
    with pytest.raises(ModelError, match=r"'onnx/vision' is missing its file onnx/vision.onnx.data"):
        OnnxRuntime.open(bundle_copy)


def test_truncated_onnx_file(bundle_copy):
    _truncate(bundle_copy / "onnx/decoder.onnx")
    with pytest.raises(ModelError, match="truncated or was replaced"):
        OnnxRuntime.open(bundle_copy)


def test_truncated_onnx_file_that_the_manifest_agrees_with(bundle_copy):
    path = bundle_copy / "onnx/decoder.onnx"
    _truncate(path)
    _rewrite_manifest(bundle_copy, "onnx/decoder", bytes=path.stat().st_size, sha256=sha256_file(path))
    with pytest.raises(ModelError, match=r"decoder.onnx: onnxruntime cannot load this file .* re-export"):
        OnnxRuntime.open(bundle_copy)


def test_truncated_external_data(bundle_copy):
    _truncate(bundle_copy / "onnx/decoder.onnx.data")
    with pytest.raises(ModelError, match=r"decoder.onnx.data: \d+ bytes, the manifest says \d+"):
        OnnxRuntime.open(bundle_copy, verify=False)
    with pytest.raises(ModelError, match="sha256 does not match"):
        OnnxRuntime.open(bundle_copy)


def test_truncated_external_data_that_the_manifest_agrees_with(bundle_copy):
    path = bundle_copy / "onnx/decoder.onnx.data"
    _truncate(path)
    path_rel = "onnx/decoder.onnx.data"
    data = json.loads((bundle_copy / "manifest.json").read_text())
    details = data["components"]["onnx/decoder"]["details"]
    details["extra_bytes"] = {path_rel: path.stat().st_size}
    details["extra_sha256"] = {path_rel: sha256_file(path)}
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"decoder.onnx: onnxruntime cannot load this file"):
        OnnxRuntime.open(bundle_copy)


def test_sha256_mismatch(bundle_copy):
    path = bundle_copy / "onnx/projector.onnx.data"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"projector.onnx.data: sha256 does not match the manifest"):
        OnnxRuntime.open(bundle_copy)
    path = bundle_copy / "onnx/projector.onnx"
    graph = bytearray(path.read_bytes())
    graph[-1] ^= 0xFF
    path.write_bytes(bytes(graph))
    with pytest.raises(ModelError, match=r"projector.onnx: sha256 .* does not match the manifest"):
        OnnxRuntime.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ModelError, match="no manifest.json; not a llava-edge bundle"):
        OnnxRuntime.open(tmp_path)
    with pytest.raises(ModelError, match="no such bundle folder"):
        OnnxRuntime.open(tmp_path / "nope")


def test_pixels_of_the_wrong_size(onnx_rt):
    with pytest.raises(ImageError, match=r"shape \(1, 3, 16, 16\); this model takes \[n, 3, 32, 32\]"):
        onnx_rt._encode_pixels(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ImageError, match=r"this model takes \[n, 3, 32, 32\]"):
        onnx_rt._encode_pixels(np.zeros((3, 32, 32), np.float32))


def test_manifest_image_size_that_disagrees_with_the_vision_model(bundle_copy):
    path = bundle_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["preprocess"]["size"] = 48
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="vision model takes 32 px images but the manifest preprocesses to 48 px"):
        OnnxRuntime.open(bundle_copy)


def test_missing_execution_provider_says_how_to_get_it(fp32_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeNotAvailable, match=r"'cuda' .* not available .* onnxruntime-gpu"):
            OnnxRuntime.open(fp32_bundle, provider="cuda")
    with pytest.raises(RuntimeNotAvailable, match="unknown execution provider 'tpu'"):
        OnnxRuntime.open(fp32_bundle, provider="tpu")
