"""Training samples: assistant-only labels, seeded image placement, truncation, grouped order."""

from __future__ import annotations

import random

import pytest
import torch

from llava_edge.model.templates import IGNORE_INDEX, get_template
from llava_edge.train.data import Collator, SampleSpec, SupervisedDataset, open_records, place_image, truncate
from llava_edge.train.sampler import EpochSampler, grouped_order


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_edge.data.synth import synth

    return synth(tmp_path_factory.mktemp("world") / "w", n=12, seed=0, image_size=32, n_eval=2).out_dir


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    from llava_edge.model.loading import load_tokenizer, read_model_info

    info = read_model_info(tiny_model_dir)
    return SampleSpec(tokenizer=load_tokenizer(tiny_model_dir), template=get_template("vicuna_v1"),
                      n_image_tokens=info.n_image_tokens, preprocess=info.preprocess, max_length=512,
                      image_position="random", seed=0)


def test_labels_are_the_assistant_replies_only(world, spec):
    dataset = SupervisedDataset(open_records(world / "stage2.json", None, False), spec)
    tok = spec.tokenizer
    for index in range(4):
        sample = dataset[(0, index)]
        record = dataset.records[index]
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        assert len(ids) == len(labels)
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
        replies = [text.strip() for role, text in record.turns if role == "gpt"]
        # Each reply, then the end-of-turn token, exactly; nothing of the user's turns or the system prompt.
        assert trained == "".join(f" {r}</s>" for r in replies)
        assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == tok.image_id)
        assert ids.count(tok.image_id) == spec.n_image_tokens
        assert sample["pixel_values"].shape == (3, 32, 32)


def test_stage1_plain_template_trains_on_the_caption(world, spec):
    plain = SampleSpec(**{**spec.__dict__, "template": get_template("plain")})
    dataset = SupervisedDataset(open_records(world / "stage1.json", None, False), plain)
    sample = dataset[0]
    caption = dataset.records[0].turns[1][1]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert spec.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == caption + "\n"
    # plain: BOS, the image, the caption; the instruction text is dropped (LLaVA's preprocess_plain)
    assert ids[: 1 + spec.n_image_tokens] == [spec.tokenizer.bos_id] + [spec.tokenizer.image_id] * spec.n_image_tokens


def test_image_position_is_randomised_seeded_and_per_epoch(world, spec):
    dataset = SupervisedDataset(open_records(world / "stage2.json", None, False), spec)
    firsts = []
    for epoch in range(6):
        ids = dataset[(epoch, 0)]["input_ids"].tolist()
        firsts.append(ids.index(spec.tokenizer.image_id))
    assert len(set(firsts)) == 2, "over 6 epochs the image should appear both before and after the question"
    assert firsts == [dataset[(e, 0)]["input_ids"].tolist().index(spec.tokenizer.image_id) for e in range(6)]
    turns = [("human", "what color is it?\n<image>"), ("gpt", "red")]
    assert place_image(turns, "first", random.Random(0))[0][1] == "<image>\nwhat color is it?"
    assert place_image(turns, "keep", random.Random(0)) == turns
    both = {place_image(turns, "random", random.Random(s))[0][1] for s in range(20)}
    assert both == {"<image>\nwhat color is it?", "what color is it?\n<image>"}


def test_truncation_never_splits_an_image_block():
    image = 9
    ids = [1, 2] + [image] * 4 + [3, 4, 5]
    labels = [-100] * 6 + [3, 4, 5]
    assert truncate(ids, labels, 8, image, 4) == (ids[:8], labels[:8], 1)
    cut_ids, _, n = truncate(ids, labels, 4, image, 4)  # the cut falls inside the image
    assert (cut_ids, n) == ([1, 2], 0)


def test_collator_pads_right_and_stacks_only_real_images(spec):
    samples = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6]),
         "pixel_values": torch.zeros(3, 32, 32)},
        {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])},  # text-only
    ]
    batch = Collator(pad_id=3)(samples)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_grouped_order_keeps_modalities_apart_and_sorts_within_a_group():
    lengths = [10 + i for i in range(40)] + [-(5 + i) for i in range(24)]  # 40 image, 24 text-only
    order = grouped_order(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(64))
    groups = [order[k:k + 8] for k in range(0, 64, 8)]
    for g in groups:
        signs = {lengths[i] > 0 for i in g}
        assert len(signs) == 1, "a global batch mixes image and text-only samples"
        assert [abs(lengths[i]) for i in g] == sorted((abs(lengths[i]) for i in g), reverse=True)


def test_sampler_order_depends_on_seed_and_epoch_only():
    lengths = [random.Random(i).randint(-20, 40) or 1 for i in range(50)]
    a = EpochSampler(lengths, seed=3, group_size=8, grouped=True)
    b = EpochSampler(lengths, seed=3, group_size=8, grouped=True)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and all(key[0] == 1 for key in a)
    b.set_epoch(2)
    assert [i for _, i in a] != [i for _, i in b]
    assert sorted(i for _, i in b) == list(range(50))
