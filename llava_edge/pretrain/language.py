"""Pretraining the demo language model on the world's text, laid out as LLaVA's templates lay it out.

The Vicuna stand-in learns the world's language and the chat layouts it will be prompted with: every
training scene's records (the stage-1 caption pair and the four stage-2 instruction kinds) become
text-only conversations (``<image>`` removed) encoded by :func:`encode_conversation`, the caption
pair with the ``plain`` template and the instructions with ``vicuna_v1``. Unlike LLaVA's instruction
tuning, the loss covers every token (a base LM models questions too); the held-out figures report
all tokens and the assistant's replies alone. Held-out conversations come from the world's eval
split, whose scenes never occur in training.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch

from llava_edge.data.records import IMAGE_TOKEN
from llava_edge.data.synth import scene_at, stage1_record, stage2_records
from llava_edge.model.templates import IGNORE_INDEX, Encoded, encode_conversation, get_template
from llava_edge.model.tokenizer import Tokenizer
from llava_edge.pretrain.optim import adamw_cosine

STAGE1_TEMPLATE = "plain"
STAGE2_TEMPLATE = "vicuna_v1"
GROUP_BATCHES = 8  # batches drawn together and grouped by length (less padding, as LLaVA's group_by_length)


def scene_conversations(seed: int, split: str, i: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """(template name, text-only turns) of every record the world writes for scene ``i``."""
    scene = scene_at(seed, split, i)
    image = f"{split}_{i:06d}.png"
    records = [stage1_record(scene, image, seed)] + stage2_records(scene, image, seed, i)
    templates = [STAGE1_TEMPLATE] + [STAGE2_TEMPLATE] * (len(records) - 1)
    return [
        (name, [(t["from"], t["value"].replace(IMAGE_TOKEN, "").strip()) for t in record["conversations"]])
        for name, record in zip(templates, records)
    ]


def encode_scenes(tokenizer: Tokenizer, seed: int, split: str, indices) -> list[Encoded]:
    return [
        encode_conversation(tokenizer, get_template(name), turns, n_image_tokens=1)
        for i in indices
        for name, turns in scene_conversations(seed, split, i)
    ]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; ``labels`` covers every real token, ``reply_labels`` the replies only."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    reply = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        mask[row, : len(e)] = 1
        reply[row, : len(e)] = torch.tensor(e.labels)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "reply_labels": reply}


def training_batches(tokenizer: Tokenizer, world_seed: int, batch_size: int,
                     rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of fresh training scenes' conversations, length-grouped, in ``rng``'s order."""
    scene = 0
    while True:
        group: list[Encoded] = []
        while len(group) < GROUP_BATCHES * batch_size:
            group += encode_scenes(tokenizer, world_seed, "train", [scene])
            scene += 1
        rng.shuffle(group)
        group = sorted(group[: GROUP_BATCHES * batch_size], key=len)
        batches = [group[k: k + batch_size] for k in range(0, len(group), batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            yield collate(batch, tokenizer.pad_id)


@torch.no_grad()
def heldout_loss(lm, tokenizer: Tokenizer, *, world_seed: int, n_scenes: int,
                 batch_size: int = 32) -> dict[str, float]:
    """Token-weighted mean loss (nats) and perplexity on the eval split's first ``n_scenes`` scenes."""
    encoded = sorted(encode_scenes(tokenizer, world_seed, "eval", range(n_scenes)), key=len)
    totals = {"labels": [0.0, 0], "reply_labels": [0.0, 0]}
    lm.eval()
    for k in range(0, len(encoded), batch_size):
        batch = collate(encoded[k: k + batch_size], tokenizer.pad_id)
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        for key, total in totals.items():
            target = batch[key][:, 1:]
            total[0] += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum").item()
            total[1] += int((target != IGNORE_INDEX).sum())
    loss, reply = (totals[k][0] / totals[k][1] for k in ("labels", "reply_labels"))
    return {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
            "reply_loss": round(reply, 4), "reply_perplexity": round(math.exp(reply), 3),
            "tokens": totals["labels"][1], "reply_tokens": totals["reply_labels"][1]}


def train_language(
    lm,
    tokenizer: Tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: float,
    world_seed: int,
    order_seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``lm`` in place (next-token loss on every token); returns the loss of every step."""
    optimizer, scheduler = adamw_cosine(lm.parameters(), lr=lr, weight_decay=weight_decay, steps=steps,
                                        warmup=warmup)
    batches = training_batches(tokenizer, world_seed, batch_size, random.Random(f"lm-order:{order_seed}"))
    lm.train()
    history = []
    for step in range(steps):
        batch = next(batches)
        loss = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
        if on_step:
            on_step(step, history[-1])
    lm.eval()
    return history
