"""Chat templates: one function builds input ids and labels for training and inference."""

import pytest

from llava_edge.errors import UserError
from llava_edge.model.templates import IGNORE_INDEX, encode_conversation, get_template
from llava_edge.model.tokenizer import Tokenizer, train_bpe

TEXTS = ["a red circle is left of a blue square. What colour is the circle? red"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(train_bpe(TEXTS, 300))


def test_vicuna_layout_matches_llava(tok):
    turns = [("human", "<image>\nWhat colour?"), ("gpt", "red"), ("human", "Shape?"), ("gpt", "circle")]
    enc = encode_conversation(tok, get_template("vicuna_v1"), turns, n_image_tokens=3)
    text = tok.decode(enc.input_ids, skip_special_tokens=False)
    system = get_template("vicuna_v1").system
    assert text == (f"<s>{system}USER: <image><image><image>\nWhat colour? ASSISTANT: red</s>"
                    "USER: Shape? ASSISTANT: circle</s>")
    # Labels: exactly the replies and their end-of-turn token; everything else ignored.
    trained = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False) == " red</s> circle</s>"
    assert enc.input_ids.count(tok.image_id) == 3 and enc.n_images == 1


def test_generation_prompt_is_training_prefix(tok):
    """The inference prompt is token-for-token the prefix of the training sequence."""
    turns = [("human", "<image>\nWhat colour?"), ("gpt", "red")]
    train = encode_conversation(tok, get_template("vicuna_v1"), turns, 4)
    infer = encode_conversation(tok, get_template("vicuna_v1"), turns[:1], 4, add_generation_prompt=True)
    assert train.input_ids[: len(infer.input_ids)] == infer.input_ids
    first_label = next(i for i, lab in enumerate(train.labels) if lab != IGNORE_INDEX)
    assert first_label == len(infer.input_ids)


def test_plain_template_is_image_then_caption(tok):
    turns = [("human", "Describe the image concisely.\n<image>"), ("gpt", "a red circle")]
    enc = encode_conversation(tok, get_template("plain"), turns, 2)
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == "<s><image><image>a red circle\n"
    assert enc.labels[:3] == [IGNORE_INDEX] * 3
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "a red circle\n"


@pytest.mark.parametrize("turns, message", [
    ([("gpt", "hi")], "expected a user turn"),
    ([("human", "a"), ("human", "b")], "expected a assistant turn"),
    ([("robot", "a")], "unknown role 'robot'"),
])
def test_bad_turns_are_named(tok, turns, message):
    with pytest.raises(UserError, match=message):
        encode_conversation(tok, get_template("vicuna_v1"), turns, 4)


def test_unknown_template():
    with pytest.raises(UserError, match="unknown chat template 'chatml'.*vicuna_v1"):
        get_template("chatml")
