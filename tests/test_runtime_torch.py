"""The torch runtime against transformers' own generate, plus the shared chat behaviour."""

import numpy as np
import pytest
import torch

from llava_edge.errors import RuntimeNotAvailable, UserError
from llava_edge.model.image import preprocess
from llava_edge.runtimes import Conversation, GenerationConfig, Prompt, open_runtime
from llava_edge.runtimes.registry import get_runtime_class, runtime_names


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    return open_runtime(tiny_model_dir, runtime="torch")


def _hf_inputs(runtime, prompt, image):
    ids = torch.from_numpy(prompt.input_ids)[None]
    pixels = torch.from_numpy(preprocess(image, runtime.preprocess_config)[None])
    return ids, pixels


def test_greedy_tokens_equal_transformers_generate(runtime, tiny_model, test_image):
    chat = Conversation(runtime)
    embeds, key = runtime._encode_with_key(test_image)
    chat._images.append((embeds, key))
    chat.turns.append(("user", "<image>\nWhat is in the picture?"))
    prompt = chat.prompt()
    ids, pixels = _hf_inputs(runtime, prompt, test_image)
    expected = tiny_model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32,
                                   do_sample=False)[0, ids.shape[1]:].tolist()
    runtime.reset()
    ours = list(runtime.generate(prompt, GenerationConfig(max_new_tokens=32)))
    if expected and expected[-1] == runtime.tokenizer.eos_id:
        expected = expected[:-1]  # we stop at end-of-sequence without yielding it
    assert len(ours) >= 8, "the random tiny model should not stop at once; test would be weak"
    assert ours == expected


def test_teacher_forced_logits_equal_transformers(runtime, tiny_model, test_image):
    embeds, key = runtime._encode_with_key(test_image)
    ids = [runtime.tokenizer.bos_id] + [runtime.image_token_id] * runtime.n_image_tokens + \
        runtime.tokenizer.encode(" a red square")
    prompt = Prompt(np.array(ids), [embeds], [key])
    ours = runtime.logits(prompt)
    ids_t, pixels = _hf_inputs(runtime, prompt, test_image)
    with torch.inference_mode():
        ref = tiny_model(input_ids=ids_t, pixel_values=pixels).logits[0].numpy()
    # Same weights and kernels; only the splice order of operations differs: float32 rounding.
    assert np.abs(ours - ref).max() < 1e-5


def test_image_encoded_once_and_kv_prefix_reused(runtime, test_image):
    runtime.reset()
    before = dict(runtime.stats)
    chat = Conversation(runtime)
    cfg = GenerationConfig(max_new_tokens=6)
    chat.ask("What colour?", image=test_image, config=cfg)
    first_prefill = runtime.stats["prefill_tokens"] - before["prefill_tokens"]
    chat.ask("And the shape?", config=cfg)
    chat.ask("Anything else?", image=test_image.copy(), config=cfg)  # same pixels, new object
    assert runtime.stats["image_encodes"] - before["image_encodes"] <= 1
    reused = runtime.stats["reused_tokens"] - before["reused_tokens"]
    assert reused > 2 * first_prefill * 0.8, "later turns must reuse the cached prefix"


def test_multi_turn_kv_reuse_does_not_change_tokens(runtime, test_image, other_image):
    """A reply computed on a reused cache equals the reply computed from a cold cache."""
    cfg = GenerationConfig(max_new_tokens=10)
    warm = Conversation(runtime)
    warm.ask("What colour?", image=test_image, config=cfg)
    warm_second = warm.ask("And this one?", image=other_image, config=cfg)
    assert runtime.stats["reused_tokens"] > 0
    cold = Conversation(runtime)
    cold.turns, cold._images = warm.turns[:3], list(warm._images)
    runtime.reset()
    assert "".join(cold.respond(cfg)) == warm_second


def test_sampling_is_reproducible_with_a_seed(runtime, test_image):
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = Conversation(runtime).ask("Describe", image=test_image, config=cfg)
    b = Conversation(runtime).ask("Describe", image=test_image, config=cfg)
    c = Conversation(runtime).ask("Describe", image=test_image,
                                  config=GenerationConfig(max_new_tokens=12, temperature=1.0, seed=8))
    assert a == b
    assert a != c


def test_stop_strings_cut_the_reply(runtime, test_image):
    full = Conversation(runtime).ask("Describe", image=test_image, config=GenerationConfig(max_new_tokens=20))
    assert len(full) > 4
    stop = full[2:4]
    cut = Conversation(runtime).ask("Describe", image=test_image,
                                    config=GenerationConfig(max_new_tokens=20, stop=(stop,)))
    assert cut == full[: full.index(stop)].strip()


def test_prompt_image_count_mismatch_is_explained(runtime):
    ids = np.array([1] + [runtime.image_token_id] * runtime.n_image_tokens)
    with pytest.raises(UserError, match="16 image-token positions but 0 image"):
        list(runtime.generate(Prompt(ids)))


def test_registry_lists_backends_and_explains_unknown_ones():
    assert "torch" in runtime_names()
    with pytest.raises(RuntimeNotAvailable, match="unknown runtime 'tpu'"):
        get_runtime_class("tpu")


def test_generation_config_rejects_bad_values():
    with pytest.raises(UserError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(UserError, match="temperature"):
        GenerationConfig(temperature=-1)
