"""The committed demo components: they load exactly, build a complete LLaVA, and are actually trained."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest
import torch

from llava_edge.errors import ModelError, UserError
from llava_edge.pretrain.assets import (
    DEMO_ASSETS,
    LANGUAGE_FILE,
    RECORD_FILE,
    TOKENIZER_FILE,
    VISION_FILE,
    demo_config,
    file_sha256,
    load_language_model,
    load_tokenizer,
    load_vision_tower,
    load_weights,
    read_record,
)
from llava_edge.pretrain.base import build_demo_base


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def config(tokenizer):
    return demo_config(tokenizer)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_demo_base(tmp_path_factory.mktemp("demo") / "base", seed=0)


def test_assets_have_the_demo_preset_shapes_and_are_small(config):
    from safetensors import safe_open
    from transformers import CLIPVisionModel, LlamaForCausalLM

    for file, model in ((VISION_FILE, CLIPVisionModel(config.vision_config)),
                        (LANGUAGE_FILE, LlamaForCausalLM(config.text_config))):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in load_weights(DEMO_ASSETS / file).items()}
        assert got == want, file
        with safe_open(str(DEMO_ASSETS / file), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, file
    sizes = {p.name: p.stat().st_size for p in DEMO_ASSETS.iterdir()}
    # fp16 of 0.83 M (vision) + 3.67 M (LM) parameters; anything bigger is not what the recipe writes.
    assert sizes[VISION_FILE] < 1.8e6 and sizes[LANGUAGE_FILE] < 7.5e6, sizes


def test_committed_tokenizer_is_the_recorded_one(tokenizer):
    record = read_record()  # raises if any file differs from the sha256 recorded at pretraining
    assert record["files"][TOKENIZER_FILE] == file_sha256(DEMO_ASSETS / TOKENIZER_FILE)
    assert record["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.image_id) == (1, 2, 3, 4)
    assert record["seed"] == 0 and record["command"].startswith("python -m llava_edge.pretrain.demo")


def test_demo_base_is_complete_and_reloads_without_new_weights(base_dir, tokenizer):
    from transformers import LlavaForConditionalGeneration

    from llava_edge.model.build import build_model
    from llava_edge.model.tokenizer import Tokenizer

    model, info = LlavaForConditionalGeneration.from_pretrained(
        base_dir, local_files_only=True, output_loading_info=True)
    assert not [k for k in info["missing_keys"] if "rotary_emb" not in k]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for key, value in load_weights(DEMO_ASSETS / VISION_FILE).items():
        assert torch.equal(state[f"model.vision_tower.{key}"], value), key
    for key, value in load_weights(DEMO_ASSETS / LANGUAGE_FILE).items():
        name = key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")
        assert torch.equal(state[name], value), key
    # The projector is the seeded random initialisation, exactly as build_model makes it.
    fresh = build_model("demo", tokenizer, seed=0).state_dict()
    for key in (k for k in state if "multi_modal_projector" in k):
        assert torch.equal(state[key], fresh[key]), key
    assert (base_dir / "tokenizer.json").read_bytes() == (DEMO_ASSETS / TOKENIZER_FILE).read_bytes()
    assert Tokenizer.from_folder(base_dir).encode("USER: where is the red circle?") == \
        tokenizer.encode("USER: where is the red circle?")
    sidecar = json.loads((base_dir / "llava_edge.json").read_text())
    assert sidecar["pretrained"]["files"] == read_record()["files"]


def test_pretraining_optimised_the_features_llava_uses(base_dir):
    """The tower was trained on image_features(); LLaVA's projector must receive exactly those."""
    from llava_edge.model.loading import load_model
    from llava_edge.pretrain.vision import image_features
    from llava_edge.pretrain.world_batches import scene_batch

    model = load_model(base_dir)
    pixels, _ = scene_batch(0, "eval", range(2), model.config.vision_config.image_size)
    with torch.no_grad():
        ours = model.model.multi_modal_projector(image_features(model.model.vision_tower, pixels))
        theirs = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
    assert torch.equal(ours, theirs)


def _loss(lm, samples, tokenizer, labels="labels"):
    from llava_edge.pretrain.language import collate, forward

    batch = collate(samples, tokenizer.pad_id, tokenizer.image_id)
    batch["labels"] = batch[labels]
    with torch.no_grad():
        return forward(lm, batch, tokenizer.image_id).loss.item()


@pytest.fixture(scope="module")
def held_out(tokenizer, config):
    from llava_edge.pretrain.language import encode_scenes, scene_tokens_for

    return encode_scenes(tokenizer, 0, "eval", range(6), scene_tokens_for(config, seed=0))  # never trained on


def test_language_model_learned_the_world_beyond_word_frequencies(tokenizer, config, held_out):
    from transformers import LlamaForCausalLM

    from llava_edge.pretrain.language import encode_scenes, scene_tokens_for

    pretrained = _loss(load_language_model(tokenizer=tokenizer), held_out, tokenizer)
    torch.manual_seed(0)
    random = _loss(LlamaForCausalLM(config.text_config).eval(), held_out, tokenizer)
    # Unigram model of the training text (add-one smoothed): what knowing word frequencies alone buys.
    train = encode_scenes(tokenizer, 0, "train", range(200), scene_tokens_for(config, seed=0))
    counts = Counter(t for s in train for t in s.encoded.input_ids[1:] if t != tokenizer.image_id)
    total, vocab = sum(counts.values()), config.text_config.vocab_size
    targets = [t for s in held_out for t in s.encoded.input_ids[1:] if t != tokenizer.image_id]
    unigram = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in targets) / len(targets)
    # A random LM is ~uniform over the 1024 ids: ln(1024) = 6.93.
    assert abs(random - math.log(vocab)) < 0.3, random
    # The constant vicuna system prompt is about a third of these tokens: a model that memorised it
    # and knew only word frequencies elsewhere would score about 0.65 x 4.2 = 2.7 nats; 1.0 needs the
    # world's sentences (pretrain.json has the held-out figure of the committed assets).
    assert pretrained < 1.0 and pretrained < unigram - 3.0, (pretrained, unigram)


def test_language_model_answers_from_the_scene_tokens(tokenizer, held_out):
    """Replies are predicted from the scene in the context: the same conversations with another
    scene's tokens in place (a rotation: each gets its neighbour's) are predicted far worse."""
    from dataclasses import replace

    lm = load_language_model(tokenizer=tokenizer)
    with_images = [s for s in held_out if s.image is not None]
    images = [s.image for s in with_images]
    swapped = [replace(s, image=images[(k + 7) % len(images)]) for k, s in enumerate(with_images)]
    own = _loss(lm, with_images, tokenizer, labels="reply_labels")
    other = _loss(lm, swapped, tokenizer, labels="reply_labels")
    # Measured on the committed assets: see pretrain.json (heldout_end.reply_loss); a model that
    # ignored its context would score the same on both, whatever its reply loss.
    assert other > own + 0.5, (own, other)


def test_reply_weight_is_a_weighted_mean_between_every_token_and_the_replies(tokenizer, held_out):
    """weighted_loss with weight 1 is transformers' own loss on every text token; as the weight
    grows it tends to the loss on the replies alone; in between it lies between the two."""
    from llava_edge.pretrain.language import collate, weighted_loss

    lm = load_language_model(tokenizer=tokenizer)
    batch = collate(held_out[:8], tokenizer.pad_id, tokenizer.image_id)
    every, replies = _loss(lm, held_out[:8], tokenizer), _loss(lm, held_out[:8], tokenizer, labels="reply_labels")
    with torch.no_grad():
        one, five, huge = (weighted_loss(lm, batch, tokenizer.image_id, w).item() for w in (1.0, 5.0, 1e9))
    assert abs(every - replies) > 0.01, (every, replies)  # else the test could not tell them apart
    # float32 sums over thousands of tokens in another order: up to 1.1e-5 relative measured; the
    # weights' effect (every token against replies) is above 30% here
    assert one == pytest.approx(every, rel=1e-4) and huge == pytest.approx(replies, rel=1e-4)
    assert min(every, replies) < five < max(every, replies)


def test_vision_features_carry_the_annotation_a_random_tower_lacks(config):
    from transformers import CLIPVisionModel

    from llava_edge.pretrain.probe import probe_accuracy

    args = dict(seed=0, n_train=120, n_test=60, tasks=("shape", "count"))
    pretrained = probe_accuracy(load_vision_tower(), **args)
    torch.manual_seed(0)  # the pretrained tower's own initialisation
    random = probe_accuracy(CLIPVisionModel(config.vision_config).eval(), **args)
    for task in ("shape", "count"):
        # Held-out objects/images: chance is ~0.35 for both; see pretrain.json for the full-size probe.
        assert pretrained[task]["accuracy"] > pretrained[task]["chance"] + 0.25, (task, pretrained)
        assert pretrained[task]["accuracy"] > random[task]["accuracy"] + 0.15, (task, pretrained, random)


def test_tampered_asset_is_refused(tmp_path):
    assets = tmp_path / "assets"
    shutil.copytree(DEMO_ASSETS, assets)
    data = bytearray((assets / VISION_FILE).read_bytes())
    data[-1] ^= 1
    (assets / VISION_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="vision.safetensors: sha256 differs.*Regenerate"):
        build_demo_base(tmp_path / "base", assets=assets)
    assert not (tmp_path / "base").exists()


def test_pretraining_refuses_a_foreign_folder_before_any_work(tmp_path):
    from llava_edge.pretrain.demo import pretrain_demo

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier demo-asset folder"):
        pretrain_demo(tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / RECORD_FILE).exists()


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_pretraining_refuses_a_reply_weight_that_is_not_positive(tmp_path, weight):
    from llava_edge.pretrain.demo import main

    assert main(["--out", str(tmp_path / "a"), "--language-reply-weight", str(weight), "--quiet"]) == 2
    assert not (tmp_path / "a").exists()  # refused before any work


def test_grid_cells_of_patches():
    from llava_edge.pretrain.world_batches import cell_pooling, patch_cells

    cells = patch_cells(64, 8).reshape(8, 8)  # 64 px, 8 px patches; cell borders at 21.3 and 42.7 px
    assert cells[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2] and cells[:, 0].tolist() == [0, 0, 0, 3, 3, 6, 6, 6]
    pool = cell_pooling(64, 8)
    assert pool.shape == (9, 64) and abs(pool.sum(1) - 1).max() < 1e-6
    # The patch spanning 16..24 px overlaps cells 0 (5.3 px) and 1 (2.7 px) on the first row.
    assert pool[0, 2] > pool[1, 2] > 0 and pool[2, 2] == 0


@pytest.mark.slow
def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    from llava_edge.pretrain.demo import DemoPretrainConfig, pretrain_demo

    config = DemoPretrainConfig(vision_steps=2, language_steps=2, probe_train_scenes=20,
                                probe_eval_scenes=10, lm_eval_scenes=2, threads=2)
    threads = torch.get_num_threads()
    first = pretrain_demo(tmp_path / "a", config, progress=False, command="x")
    second = pretrain_demo(tmp_path / "b", config, progress=False, command="x")
    assert first.pop("run")["threads"] == second.pop("run")["threads"] == 2
    assert first == second  # metrics and the sha256 of every file
    assert torch.get_num_threads() == threads  # the run's thread count does not leak into the caller


def test_pretraining_refuses_fewer_than_one_language_epoch(tmp_path):
    from llava_edge.pretrain.demo import main

    assert main(["--out", str(tmp_path / "a"), "--language-epochs", "0", "--quiet"]) == 2
    assert not (tmp_path / "a").exists()  # refused before any work


def test_each_language_epoch_passes_over_the_same_batches(tokenizer, config):
    """With the learning rate at 0 the weights never move, so the second pass's losses equal the
    first's exactly if and only if it reads the same batches in the same order."""
    from transformers import LlamaForCausalLM

    from llava_edge.pretrain.language import scene_tokens_for, train_language

    text = config.text_config.__class__(**{**config.text_config.to_dict(), "num_hidden_layers": 1})
    torch.manual_seed(0)
    lm = LlamaForCausalLM(text)
    steps_seen = []
    args = dict(steps=3, batch_size=2, weight_decay=0.0, warmup=0.0, world_seed=0, order_seed=0)
    tokens = scene_tokens_for(config, 0)
    losses = train_language(lm, tokenizer, tokens, lr=0.0, epochs=2, on_step=lambda s, _: steps_seen.append(s), **args)
    assert steps_seen == list(range(6)) and len(losses) == 6
    assert losses[:3] == losses[3:] and len(set(losses[:3])) == 3  # three different batches, twice
    with pytest.raises(ValueError, match="epochs 0"):
        train_language(lm, tokenizer, tokens, lr=0.0, epochs=0, **args)
