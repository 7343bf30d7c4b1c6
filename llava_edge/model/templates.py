"""Chat templates and the one function that turns a conversation into model inputs.

Training and inference both call :func:`encode_conversation`, so the prompt a model is trained on
and the prompt it is run with cannot drift apart. ``<image>`` in a turn's text is expanded to the
exact number of image tokens; labels are -100 everywhere except the assistant's replies (and the
end-of-turn token that closes each reply), as in LLaVA's ``preprocess_v1`` / ``preprocess_plain``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llava_edge.errors import UserError
from llava_edge.model.tokenizer import Tokenizer

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
USER, ASSISTANT = "user", "assistant"

# LLaVA's accepted role names (its JSON says human/gpt) mapped onto ours.
ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are laid out as text. ``plain`` is stage 1's, ``vicuna_v1`` is LLaVA-1.5's."""

    name: str
    system: str
    user_prefix: str  # text before a user message
    assistant_prefix: str  # text after the user message, before the reply (the generation prompt)
    reply_end: str  # closes an assistant reply; part of its label
    stop: tuple[str, ...]  # strings that end generation
    image_only_prompt: bool = False  # plain: the user turn is reduced to the image alone
    jinja: str = field(default="", repr=False)  # the same layout for transformers / llama.cpp


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA conv_vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
_VICUNA_JINJA = (
    "{{ bos_token }}" + _VICUNA_SYSTEM + " "
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# LLaVA conv_llava_plain: "<image>{caption}\n"
_PLAIN_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<image>"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}\n"
    "{% endif %}{% endfor %}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="vicuna_v1", system=_VICUNA_SYSTEM + " ", user_prefix="USER: ",
            assistant_prefix=" ASSISTANT:", reply_end="</s>", stop=("</s>",), jinja=_VICUNA_JINJA,
        ),
        ChatTemplate(
            name="plain", system="", user_prefix="", assistant_prefix="", reply_end="\n",
            stop=("\n",), image_only_prompt=True, jinja=_PLAIN_JINJA,
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown chat template {name!r}; choose one of: {', '.join(TEMPLATES)}") from None


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int

    def __len__(self) -> int:
        return len(self.input_ids)


def normalise_turns(turns) -> list[tuple[str, str]]:
    """Accept (role, text) pairs or LLaVA/OpenAI-style dicts; check roles alternate from the user."""
    out = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict):
            role = turn.get("from", turn.get("role"))
            text = turn.get("value", turn.get("content"))
        else:
            role, text = turn
        if role not in ROLE_ALIASES:
            raise UserError(f"turn {i}: unknown role {role!r} (expected human/gpt or user/assistant)")
        role = ROLE_ALIASES[role]
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            raise UserError(f"turn {i}: expected a {expected} turn, got {role} (turns must alternate, user first)")
        if not isinstance(text, str):
            raise UserError(f"turn {i}: text must be a string, got {type(text).__name__}")
        out.append((role, text))
    return out


def encode_conversation(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    turns,
    n_image_tokens: int,
    *,
    add_generation_prompt: bool = False,
    add_bos: bool = True,
) -> Encoded:
    """Token ids and labels of a conversation, ``<image>`` expanded to ``n_image_tokens`` ids.

    With ``add_generation_prompt`` the conversation must end on a user turn and the result ends
    with the assistant prefix, ready for generation.
    """
    turns = normalise_turns(turns)
    if add_generation_prompt and (not turns or turns[-1][0] != USER):
        raise UserError("a generation prompt needs the conversation to end with a user turn")
    ids: list[int] = [tokenizer.bos_id] if add_bos else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)

    def add(text: str, train: bool) -> None:
        if not text:
            return
        piece = tokenizer.encode(text)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    add(template.system, False)
    for role, text in turns:
        if role == USER:
            if template.image_only_prompt:
                text = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in text else ""
            add(template.user_prefix + text + template.assistant_prefix, False)
        else:
            # The reply starts right after the assistant prefix; vicuna puts a space between.
            sep = " " if template.assistant_prefix.endswith(":") else ""
            add(sep + text.strip() + template.reply_end, True)

    n_images = ids.count(tokenizer.image_id)
    if n_image_tokens != 1 and n_images:
        expanded_ids, expanded_labels = [], []
        for tid, lab in zip(ids, labels):
            if tid == tokenizer.image_id:
                expanded_ids.extend([tid] * n_image_tokens)
                expanded_labels.extend([IGNORE_INDEX] * n_image_tokens)
            else:
                expanded_ids.append(tid)
                expanded_labels.append(lab)
        ids, labels = expanded_ids, expanded_labels
    return Encoded(input_ids=ids, labels=labels, n_images=n_images)
