"""Pretraining the demo language model on the world's conversations, laid out as LLaVA's templates lay them out.

The Vicuna stand-in learns the world's language, the chat layouts it will be prompted with, and to
answer from what stands in its context where the image goes. Every training scene's records (the
stage-1 caption pair, the four stage-2 instruction kinds and a *look-up drill*) are encoded by
:func:`encode_conversation`, the caption pair with the ``plain`` template and the others with
``vicuna_v1``. The drill (``synth.drill_record``) asks every look-up the scene answers, a named
shape's place, size or colour, a kind's count, whether a colour+kind is there, in one conversation:
the stage-2 records ask about one of each per scene, too few for a 4-layer LM to learn to look a
named shape up among the image tokens. With it the LM answers 80.8% of the eval split's short
questions from the true scene tokens after 2000 steps, against 73.0% without (500 scenes; issue 4's
note). Stage 2 trains on the LLaVA-style records alone.

Unlike LLaVA's instruction tuning, the loss covers every text token (a base LM models questions
too, and the colour look-up is learned from them: a kind word follows every colour word), but a
reply token weighs ``reply_weight`` times a prompt token (:func:`weighted_loss`; the assets use 5).
Replies are about a fifth of the text tokens, and the short answers, which carry most of what must
be looked up by kind or read out as a place, 7%. Weighing them 5 times added about 2 points of the
LM's ceiling on the questions above in both same-thread pairs (2 threads, the committed assets
before and after: 80.8% -> 82.8%; 1 thread: 84.8% -> 86.6%); 15 times loses (76.6%: the questions'
own signal fades). But draws of one design spread by as much: 80.8% with 2 threads and 84.8% with 1
(plain mean, same seed); over 7 draws (seeds 0-2) both weights average 83.1% (500 scenes, 2000
steps, issue 4's note), so the weight is kept as harmless and the assets as the better draw. The
held-out figures report the plain mean over all tokens and over the replies alone. Held-out
conversations come from the world's eval split, whose scenes never occur in training.

``epochs`` passes over the same batches each use a fresh optimiser, their own warm-up and their
own cosine decay. A second pass is where the look-up by kind appears: session 10's one-pass LM
continued so for 2000 steps went from 82.8% to 92.4% of those questions (a named kind's colour
61% -> 98%, a kind's count 79% -> 100%; 500 scenes, issue 4's note), where session 6's single
10000-step schedule had stopped near 82%. The committed assets are made with two passes (the
default): the recipe went from 80.6% (one pass) to 85.3% with them. A named shape's place stays
the weakest look-up (64%): a linear probe (benchmarks/demo_place_probe.py) finds the one-pass LM
carrying the place of the scene's first shape in reading order at the answer, not the named one's.

What stands where the image goes (``context``):

- ``"scene"`` (the committed assets): **scene tokens**, one vector per image patch (as many as the
  vision tower gives, in its row-major order), each the sum of fixed random vectors naming what
  the scene has there: the colour, kind and size of the shape in the patch's grid cell (or "none"),
  the background and the patch's position (:class:`SceneTokens`). The LM never sees a pixel nor the
  vision tower: it learns to read a scene from a grid of vectors and to reason about it (count,
  compare, pick the option letter), the skills a real Vicuna brings to LLaVA and that a 4-layer LM
  cannot learn in the demo's 10 CPU minutes on top of learning to see. Aligning the vision tower to
  what the LM reads is left to the projector (stage 1) and to stage 2, as in LLaVA: stage 1 has to
  find, from the tower's features alone, tokens the frozen LM answers from.
- ``"none"``: ``<image>`` removed; answers can then only be guessed from the question (the first
  assets were trained so: the demo recipe reached 60-70% exact match, see benchmarks/).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llava_edge.data.records import IMAGE_TOKEN
from llava_edge.data.synth import drill_record, scene_at, stage1_record, stage2_records
from llava_edge.data.world import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene
from llava_edge.model.templates import IGNORE_INDEX, Encoded, encode_conversation, get_template
from llava_edge.model.tokenizer import Tokenizer
from llava_edge.pretrain.optim import train_loop
from llava_edge.pretrain.world_batches import patch_cells, scene_targets

STAGE1_TEMPLATE = "plain"
STAGE2_TEMPLATE = "vicuna_v1"
GROUP_BATCHES = 8  # batches drawn together and grouped by length (less padding, as LLaVA's group_by_length)
CONTEXTS = ("scene", "none")


class SceneTokens:
    """Fixed random vectors (seeded) summed into one token per image patch; see the module docstring.

    Each table row is drawn N(0, 1/width): unit length in expectation, about as long as a trained
    projector's output rows are per feature, and nearly orthogonal to each other at width 256."""

    def __init__(self, width: int, image_size: int, patch_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.cells = torch.from_numpy(patch_cells(image_size, patch_size))  # [n_patches] -> grid cell
        n_patches = len(self.cells)

        def table(n: int) -> torch.Tensor:
            return torch.randn(n, width, generator=g) / math.sqrt(width)

        self.color, self.shape, self.size = table(len(COLORS) + 1), table(len(SHAPES) + 1), table(len(SIZES) + 1)
        self.background, self.position = table(len(BACKGROUNDS)), table(n_patches)
        self._backgrounds = tuple(sorted(BACKGROUNDS))

    def __call__(self, scene: Scene) -> torch.Tensor:
        """[n_patches, width] tokens of one scene."""
        cells = scene_targets(scene)
        return self.from_cells(*(torch.from_numpy(cells[k]) for k in ("color", "shape", "size")), scene.background)

    def from_cells(self, color: torch.Tensor, shape: torch.Tensor, size: torch.Tensor, background: str) -> torch.Tensor:
        """[n_patches, width] tokens from per-cell class indices ([9] each, cells in reading order,
        classes as ``world_batches.CELL_CLASSES`` numbers them, 0 = no shape)."""
        c = self.cells
        return (self.color[color[c]] + self.shape[shape[c]] + self.size[size[c]]
                + self.background[self._backgrounds.index(background)] + self.position)


@dataclass
class Sample:
    encoded: Encoded
    image: torch.Tensor | None  # [n_image_tokens, width] scene tokens, or None (no image in the text)


def pretraining_records(scene: Scene, image: str, seed: int, i: int) -> list[tuple[str, dict]]:
    """(template name, LLaVA record) of everything the LM pretrains on for scene ``i``: the world's
    caption pair in ``plain``, its four stage-2 records and the look-up drill in ``vicuna_v1``."""
    return [(STAGE1_TEMPLATE, stage1_record(scene, image, seed)),
            *((STAGE2_TEMPLATE, r) for r in stage2_records(scene, image, seed, i)),
            (STAGE2_TEMPLATE, drill_record(scene, image, i))]


def scene_conversations(seed: int, split: str, i: int,
                        context: str = "scene") -> tuple[Scene, list[tuple[str, list[tuple[str, str]]]]]:
    """(the scene, [(template name, turns)]) of :func:`pretraining_records` for scene ``i`` of
    ``split``; ``<image>`` kept for ``"scene"``, removed for ``"none"``."""
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r}: expected one of {', '.join(CONTEXTS)}")
    scene = scene_at(seed, split, i)
    keep = context == "scene"
    return scene, [
        (name, [(t["from"], t["value"] if keep else t["value"].replace(IMAGE_TOKEN, "").strip())
                for t in record["conversations"]])
        for name, record in pretraining_records(scene, f"{split}_{i:06d}.png", seed, i)
    ]


def encode_scenes(tokenizer: Tokenizer, seed: int, split: str, indices, tokens: SceneTokens | None = None,
                  context: str = "scene") -> list[Sample]:
    """Encoded conversations of scenes ``indices``; ``tokens`` is required for ``"scene"``."""
    if context == "scene" and tokens is None:
        raise ValueError("the scene context needs its SceneTokens")
    n_image = len(tokens.cells) if tokens is not None else 1
    samples = []
    for i in indices:
        scene, conversations = scene_conversations(seed, split, i, context)
        image = tokens(scene) if context == "scene" else None
        for name, turns in conversations:
            encoded = encode_conversation(tokenizer, get_template(name), turns, n_image_tokens=n_image)
            samples.append(Sample(encoded, image if tokenizer.image_id in encoded.input_ids else None))
    return samples


def collate(batch: list[Sample], pad_id: int, image_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; ``labels`` covers every text token, ``reply_labels`` the replies only;
    ``image_tokens`` [N images, n_image_tokens, width] in batch order (absent without images)."""
    width = max(len(s.encoded) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    reply = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, : len(s.encoded)] = torch.tensor(s.encoded.input_ids)
        mask[row, : len(s.encoded)] = 1
        reply[row, : len(s.encoded)] = torch.tensor(s.encoded.labels)
    labels = ids.masked_fill((mask == 0) | (ids == image_id), IGNORE_INDEX)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "reply_labels": reply}
    images = [s.image for s in batch if s.image is not None]
    if images:
        out["image_tokens"] = torch.stack(images)
    return out


def forward(lm, batch: dict[str, torch.Tensor], image_id: int, labels: str | None = "labels"):
    """The LM on a collated batch, scene tokens in place of the image ids."""
    ids = batch["input_ids"]
    embeds = lm.get_input_embeddings()(ids)
    if "image_tokens" in batch:
        where = ids == image_id
        embeds = embeds.masked_scatter(where.unsqueeze(-1), batch["image_tokens"].to(embeds.dtype))
    return lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
              labels=batch[labels] if labels else None)


def training_batches(tokenizer: Tokenizer, tokens: SceneTokens | None, world_seed: int, batch_size: int,
                     rng: random.Random, context: str = "scene") -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of fresh training scenes' conversations, length-grouped, in ``rng``'s order."""
    scene = 0
    while True:
        group: list[Sample] = []
        while len(group) < GROUP_BATCHES * batch_size:
            group += encode_scenes(tokenizer, world_seed, "train", [scene], tokens, context)
            scene += 1
        rng.shuffle(group)
        group = sorted(group[: GROUP_BATCHES * batch_size], key=lambda s: len(s.encoded))
        batches = [group[k: k + batch_size] for k in range(0, len(group), batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            yield collate(batch, tokenizer.pad_id, tokenizer.image_id)


@torch.no_grad()
def heldout_loss(lm, tokenizer: Tokenizer, tokens: SceneTokens | None, *, world_seed: int, n_scenes: int,
                 context: str = "scene", batch_size: int = 32) -> dict[str, float]:
    """Token-weighted mean loss (nats) and perplexity on the eval split's first ``n_scenes`` scenes."""
    samples = sorted(encode_scenes(tokenizer, world_seed, "eval", range(n_scenes), tokens, context),
                     key=lambda s: len(s.encoded))
    totals = {"labels": [0.0, 0], "reply_labels": [0.0, 0]}
    lm.eval()
    for k in range(0, len(samples), batch_size):
        batch = collate(samples[k: k + batch_size], tokenizer.pad_id, tokenizer.image_id)
        per_token = token_losses(lm, batch, tokenizer.image_id)
        for key, total in totals.items():
            counted = batch[key][:, 1:] != IGNORE_INDEX  # reply tokens are text tokens with the same targets
            total[0] += per_token[counted].sum().item()
            total[1] += int(counted.sum())
    loss, reply = (totals[k][0] / totals[k][1] for k in ("labels", "reply_labels"))
    return {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
            "reply_loss": round(reply, 4), "reply_perplexity": round(math.exp(reply), 3),
            "tokens": totals["labels"][1], "reply_tokens": totals["reply_labels"][1]}


def token_losses(lm, batch: dict[str, torch.Tensor], image_id: int) -> torch.Tensor:
    """[batch, length - 1] next-token loss of every position (0 where ``labels`` ignores it)."""
    logits = forward(lm, batch, image_id, labels=None).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"][:, 1:],
                                             ignore_index=IGNORE_INDEX, reduction="none")


def weighted_loss(lm, batch: dict[str, torch.Tensor], image_id: int, reply_weight: float) -> torch.Tensor:
    """Next-token loss over every text token of ``batch``, a weighted mean in which each reply token
    (``reply_labels``) counts ``reply_weight`` times as much as a prompt token; 1 is the plain mean."""
    weight = torch.where(batch["reply_labels"][:, 1:] != IGNORE_INDEX, reply_weight, 1.0)
    weight = weight * (batch["labels"][:, 1:] != IGNORE_INDEX)
    return (token_losses(lm, batch, image_id) * weight).sum() / weight.sum()


def train_language(
    lm,
    tokenizer: Tokenizer,
    tokens: SceneTokens | None,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: float,
    world_seed: int,
    order_seed: int,
    reply_weight: float = 1.0,
    epochs: int = 1,
    context: str = "scene",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``lm`` in place (next-token loss on every text token, replies weighted ``reply_weight``
    times, :func:`weighted_loss`); returns the loss of every step.

    ``epochs`` passes over the same ``steps`` batches, each a fresh AdamW with its own warm-up and
    cosine decay (a warm restart). ``on_step`` numbers the steps across passes."""
    if epochs < 1:
        raise ValueError(f"epochs {epochs}: must be at least 1")
    history: list[float] = []
    lm.train()
    for epoch in range(epochs):
        batches = training_batches(tokenizer, tokens, world_seed, batch_size,
                                   random.Random(f"lm-order:{order_seed}"), context)
        offset = epoch * steps
        history += train_loop(lm.parameters(),
                              lambda step: weighted_loss(lm, next(batches), tokenizer.image_id, reply_weight),
                              steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup,
                              on_step=on_step and (lambda step, loss: on_step(offset + step, loss)))
    lm.eval()
    return history


def scene_tokens_for(config, seed: int) -> SceneTokens:
    """The scene tokens of a demo :class:`LlavaConfig` (LM width, the tower's patch grid)."""
    vision = config.vision_config
    # Offset so the tables never share a random stream with the model's initialisation (same seed).
    return SceneTokens(config.text_config.hidden_size, vision.image_size, vision.patch_size, seed=seed + 1_000_003)
