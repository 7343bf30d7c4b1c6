"""Variants of the demo LM's pretraining, scored on the LM's own ceiling (true scene tokens).

    python benchmarks/demo_lm_variants.py committed no-drill --steps 800 --scenes 300 [--threads 1]

Each variant pretrains a fresh demo LM (``pretrain.language.train_language``, the committed batch
size, learning rate and seed) for ``--steps`` steps, then answers the eval split's questions from the
true scene tokens, as ``demo_ceilings.py``'s first line does for the committed assets. It is a
diagnostic for issue 4 (why the recipe stops near 75% exact match, against a 90% target), not part of
the product: a variant changes the pretraining by patching ``pretrain.language`` for this process.
Join variants with ``+`` (``no-drill+cell-position``). Results: benchmarks/train_demo_report.json,
``history_of_this_recipe``.

- ``committed``: the committed design (since session 7 with the look-up drill, since session 10
  with replies weighing 5 times a prompt token in the loss); the figures of sessions 7-9 were taken
  with a plain mean, which ``reply-weight=1`` gives;
- ``no-drill``: without the look-up drill (``synth.drill_record``), the design before session 7;
- ``cell-position``: the position part of a scene token names the patch's grid cell (9 vectors)
  instead of the patch (64);
- ``single-turn``: the stage-2 ``conversation`` record split into one single-turn record per question;
- ``word-embeddings``: a scene token is the sum of the LM's own input embeddings of the words naming
  the cell (colour, kind, size, place) and the background, learned with the LM;
- ``reply-loss``: the loss on the replies only (the committed LM learns every text token);
  ``reply-weight=X``: a reply token weighs X times a prompt token (``language.weighted_loss``);
  ``batch=N``: N sequences per step; ``seed=N``: another initialisation and batch order;
- ``drills=N``: N look-up drills per scene, each in its own order; ``drop=mc,reasoning``: those
  records left out;
- ``lr=X``: peak learning rate X; ``layers=N``: an N-layer LM; ``heads=H,KV``: H query heads,
  KV key/value heads; ``init=X``: initialisation standard deviation X; ``rope-theta=X``: RoPE base X;
- ``inventory=N``: N more records per scene listing the shapes kind first; ``colour-inventory``: one
  listing them colour first, place next; ``louder=shape:2``: one
  part of the scene tokens scaled; ``embed-init=in,out``: the LM's colour, kind and size words start
  aligned with the scene tokens; ``listing=name-place,kind-color``: records naming each shape and
  its place (or a lone kind and its colour) right after it; ``from-committed``: continue from the committed LM (see each function).

``--save DIR`` keeps each variant's LM (``DIR/VARIANT.safetensors``) for ``demo_lm_attention.py --lm``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_edge.pretrain.language as language  # noqa: E402
from demo_ceilings import score  # noqa: E402
from llava_edge.data.records import GPT, HUMAN, IMAGE_TOKEN, to_json_record  # noqa: E402
from llava_edge.data.language import _color, _position, _size, lookup_questions  # noqa: E402
from llava_edge.data.synth import _first_turn, _qa_turns, scene_at  # noqa: E402
from llava_edge.data.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES  # noqa: E402
from llava_edge.pretrain.demo import DemoPretrainConfig  # noqa: E402

DEFAULTS = DemoPretrainConfig()


class Run:
    """What a variant may change: the LM's config, the scene tokens, the records pretraining reads
    (``language.pretraining_records``) and how a batch's image slots are filled."""

    def __init__(self):
        from llava_edge.model.build import make_tokenizer
        from llava_edge.model.presets import get_preset
        from llava_edge.pretrain.assets import PRESET, demo_config

        self.tokenizer = make_tokenizer(get_preset(PRESET))
        self.config = demo_config(self.tokenizer)
        self.tokens = language.scene_tokens_for(self.config, DEFAULTS.seed)
        self.records = language.pretraining_records
        self.forward = language.forward
        self.to_embeddings = None  # lm, image tensor -> scene tokens (for tokens learned with the LM)
        self.lm_init: list = []  # functions of the freshly built LM, applied in order before training
        self.lr = DEFAULTS.language_lr
        self.batch_size = DEFAULTS.language_batch_size
        self.reply_weight = DEFAULTS.language_reply_weight
        self.seed = DEFAULTS.seed  # the LM's initialisation and batch order (the world's scenes stay seed 0's)


def cell_position(run: Run) -> None:
    t, width = run.tokens, run.config.text_config.hidden_size
    g = torch.Generator().manual_seed(DEFAULTS.seed + 99)
    t.position = (torch.randn(len(POSITIONS), width, generator=g) / math.sqrt(width))[t.cells]


def single_turn(run: Run) -> None:
    records = run.records

    def split(scene, image, seed, i):
        out = []
        for template, record in records(scene, image, seed, i):
            if not record["id"].endswith("_conversation"):
                out.append((template, record))
                continue
            turns, rng = record["conversations"], random.Random(f"split:{i}")
            for k in range(0, len(turns), 2):
                q = turns[k]["value"].replace(IMAGE_TOKEN, "").strip()
                q = f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.5 else f"{q}\n{IMAGE_TOKEN}"
                out.append((template, to_json_record(f"{record['id']}_{k // 2}", image,
                                                     [(HUMAN, q), (GPT, turns[k + 1]["value"])])))
        return out

    run.records = split


def word_embeddings(run: Run) -> None:
    tok, cells, vocab = run.tokenizer, run.tokens.cells, run.config.text_config.vocab_size

    def word(w: str) -> int:
        ids = tok.encode(" " + w)
        if len(ids) != 1:
            raise ValueError(f"{w!r} is {len(ids)} tokens")
        return ids[0]

    words = {*COLORS, *SHAPES, *SIZES, *BACKGROUNDS, *(w for name in POSITIONS.values() for w in name.split())}
    ids = {w: word(w) for w in words}  # tokenised once, not per patch

    def counts(scene) -> torch.Tensor:
        """[n_patches, vocab]: how often each word names the patch's cell."""
        per_cell = torch.zeros(len(POSITIONS), vocab)
        for (r, c), name in POSITIONS.items():
            for w in name.split() + [scene.background]:
                per_cell[r * 3 + c, ids[w]] += 1
        for s in scene.shapes:
            for w in (s.color, s.shape, s.size):
                per_cell[s.cell[0] * 3 + s.cell[1], ids[w]] += 1
        return per_cell[cells]

    def to_embeddings(lm, image: torch.Tensor) -> torch.Tensor:
        return image @ lm.get_input_embeddings().weight

    base = run.forward  # captured: measure() installs ``forward`` in its place

    def forward(lm, batch, image_id, labels="labels"):
        if "image_tokens" in batch:
            batch = {**batch, "image_tokens": to_embeddings(lm, batch["image_tokens"])}
        return base(lm, batch, image_id, labels)

    counts.cells = cells  # what encode_scenes counts the image tokens by
    run.tokens, run.forward, run.to_embeddings = counts, forward, to_embeddings


def drop(run: Run, kinds: str) -> None:
    """Leave the records whose id ends in one of ``kinds`` (``mc,reasoning``) out of pretraining."""
    records, ends = run.records, tuple(f"_{k}" for k in kinds.split(","))
    run.records = lambda scene, image, seed, i: [(t, r) for t, r in records(scene, image, seed, i)
                                                 if not r["id"].endswith(ends)]


def drills(run: Run, n: str) -> None:
    """``n`` look-up drills per scene, each in its own order (the first is the committed one)."""
    records = run.records

    def more(scene, image, seed, i):
        out = records(scene, image, seed, i)
        for k in range(1, int(n)):
            rng = random.Random(f"drill:{k}:{i}")
            turns = _qa_turns(lookup_questions(scene, rng), rng)
            out.append((language.STAGE2_TEMPLATE, to_json_record(f"{image[:-4]}_drill{k}", image, turns)))
        return out

    run.records = more


def inventory_records(scene, image: str, i: int, n: int) -> list[tuple[str, dict]]:
    """N records listing the shapes kind first (``circle red large top left; square ...``; the
    first by kind, the others in random orders), so the token after a shape word is an attribute of
    that kind: a next-token signal for a look-up keyed by kind, which the world's texts never give
    (they name size, colour, then kind)."""
    out = []
    for k in range(n):
        rng = random.Random(f"inventory:{k}:{i}")
        shapes = (sorted(scene.shapes, key=lambda s: (SHAPES.index(s.shape), s.cell)) if k == 0
                  else rng.sample(scene.shapes, len(scene.shapes)))
        listing = "; ".join(f"{s.shape} {s.color} {s.size} {s.position}" for s in shapes)
        turns = _first_turn("list the shapes by kind." if k == 0 else "list the shapes.", rng)
        out.append((language.STAGE2_TEMPLATE,
                    to_json_record(f"{image[:-4]}_inventory{k}", image, turns + [(GPT, f"{listing}.")])))
    return out


def colour_inventory_records(scene, image: str, i: int) -> list[tuple[str, dict]]:
    """One record listing the shapes colour first, place next (``red top left large circle; ...``),
    in random order: the colour-keyed look-up the LM learns anyway (for the kind that follows a colour
    word) gets a next-token signal to fetch the place and size too, which a question like ``where is
    the red circle?`` then needs only to read back from the colour word."""
    rng = random.Random(f"colour-inventory:{i}")
    listing = "; ".join(f"{s.color} {s.position} {s.size} {s.shape}" for s in rng.sample(scene.shapes, len(scene.shapes)))
    turns = _first_turn("list the shapes by color.", rng) + [(GPT, f"{listing}.")]
    return [(language.STAGE2_TEMPLATE, to_json_record(f"{image[:-4]}_colour_inventory", image, turns))]


def colour_inventory(run: Run) -> None:
    """``colour-inventory``: :func:`colour_inventory_records` added to every scene's records."""
    records = run.records
    run.records = lambda scene, image, seed, i: records(scene, image, seed, i) + colour_inventory_records(scene, image, i)


def inventory(run: Run, n: str = "1") -> None:
    """``inventory=N``: :func:`inventory_records` added to every scene's records."""
    records = run.records
    run.records = lambda scene, image, seed, i: records(scene, image, seed, i) + inventory_records(scene, image, i, int(n))


def warmup_inventory(run: Run, n: str) -> None:
    """``warmup-inventory=N``: the first N training scenes give three kind-first listings each
    (:func:`inventory_records`) and nothing else, so a look-up keyed by kind can be learned before
    the colour-keyed one stands in for it; later scenes give the records before this variant."""
    records = run.records
    run.records = lambda scene, image, seed, i: (inventory_records(scene, image, i, 3) if i < int(n)
                                                 else records(scene, image, seed, i))


LISTINGS = {  # what a listing names each shape by, and what follows that name at once
    "name-place": ("list the shapes and their places.", lambda scene, s: (f"{s.color} {s.shape}", s.position)),
    "kind-color": ("list the color of each kind that occurs once.",
                   lambda scene, s: (s.shape, s.color) if scene.count(shape=s.shape) == 1 else None),
}


def listing_records(scene, image: str, i: int, kinds: list[str]) -> list[tuple[str, dict]]:
    """One record per listing kind (:data:`LISTINGS`), the shapes in a random order, each named and
    followed at once by what it keys (``red circle top left; blue square center.``): a look-up by
    name (or by a lone kind) whose answer is the very next token, which the world's texts and its
    questions never give (a question's answer comes 3 tokens after the name, behind ``? ASSISTANT:``)."""
    out = []
    for kind in kinds:
        prompt, item = LISTINGS[kind]
        rng = random.Random(f"listing:{kind}:{i}")
        items = [x for x in (item(scene, s) for s in rng.sample(scene.shapes, len(scene.shapes))) if x]
        if items:
            text = "; ".join(f"{key} {value}" for key, value in items) + "."
            out.append((language.STAGE2_TEMPLATE, to_json_record(f"{image[:-4]}_listing_{kind}", image,
                                                                 _first_turn(prompt, rng) + [(GPT, text)])))
    return out


def listing(run: Run, kinds: str = "name-place,kind-color") -> None:
    """``listing=name-place,kind-color``: :func:`listing_records` of those kinds added to every scene's records."""
    unknown = set(kinds.split(",")) - set(LISTINGS)
    if unknown:
        raise SystemExit(f"unknown listing {sorted(unknown)}; expected {', '.join(LISTINGS)}")
    records = run.records
    run.records = lambda scene, image, seed, i: records(scene, image, seed, i) + listing_records(scene, image, i, kinds.split(","))


def keyed_records(scene, image: str, i: int, n: int) -> list[tuple[str, dict]]:
    """N single-turn records (image first, as the eval asks), each a look-up keyed by name: a random
    shape's place or size, or the colour of a kind that occurs once. The committed LM answers these
    with the scene's first shape in reading order whatever is named (a linear probe reads that
    shape's place at 95% at the answer position, the named one's at the 41% the two coincide)."""
    rng = random.Random(f"keyed:{i}")
    out = []
    for k in range(n):
        s = rng.choice(scene.shapes)
        asks = [_position(s), _size(s)] + ([_color(s)] if scene.count(shape=s.shape) == 1 else [])
        qa = rng.choice(asks)
        turns = [(HUMAN, f"{IMAGE_TOKEN}\n{qa.question}"), (GPT, qa.answer)]
        out.append((language.STAGE2_TEMPLATE, to_json_record(f"{image[:-4]}_keyed{k}", image, turns)))
    return out


def keyed(run: Run, spec: str = "4") -> None:
    """``keyed=N``: :func:`keyed_records` (N per scene) added to every scene's records;
    ``keyed=N:only``: those records alone."""
    n, _, only = spec.partition(":")
    records = run.records
    run.records = lambda scene, image, seed, i: (
        ([] if only else records(scene, image, seed, i)) + keyed_records(scene, image, i, int(n)))


def kind_names(run: Run) -> None:
    """``kind-names``: the drill names a shape whose kind occurs once by its kind alone (``where is
    the triangle?``), so its place and size questions need the look-up keyed by kind."""
    records = run.records

    def rename(scene, image, seed, i):
        out = []
        for template, record in records(scene, image, seed, i):
            if record["id"].endswith("_drill"):
                record = json.loads(json.dumps(record))
                for turn in record["conversations"]:
                    for shape in scene.shapes:
                        if scene.count(shape=shape.shape) == 1:
                            turn["value"] = turn["value"].replace(f"the {shape.color} {shape.shape}", f"the {shape.shape}")
            out.append((template, record))
        return out

    run.records = rename


def louder(run: Run, spec: str) -> None:
    """``louder=shape:2``: that part of every scene token (colour, shape, size) scaled by 2."""
    part, _, factor = spec.partition(":")
    setattr(run.tokens, part, getattr(run.tokens, part) * float(factor))


def embed_init(run: Run, where: str = "in,out") -> None:
    """``embed-init=in,out``: the LM's input embedding (``in``) and/or output (``out``) rows of every
    colour, kind (singular and plural) and size word start as that word's scene-token table row, at
    the initialisation's scale: the LM starts out with its words and the scene tokens aligned."""
    def init(lm) -> None:
        t, tok = run.tokens, run.tokenizer
        scale = run.config.text_config.initializer_range * math.sqrt(run.config.text_config.hidden_size)
        rows = {}
        for table, names in ((t.color, COLORS), (t.shape, SHAPES), (t.size, SIZES)):
            for k, name in enumerate(names, start=1):  # row 0 = no shape
                rows[name] = table[k]
                if table is t.shape:
                    rows[name + "s"] = table[k]
        with torch.no_grad():
            for word, row in rows.items():
                (token,) = tok.encode(" " + word)
                vec = row / row.norm() * scale
                if "in" in where:
                    lm.get_input_embeddings().weight[token] = vec
                if "out" in where:
                    lm.get_output_embeddings().weight[token] = vec

    run.lm_init.append(init)


def from_committed(run: Run) -> None:
    """``from-committed``: start from the committed assets' LM instead of a fresh initialisation
    (continued pretraining; the schedule restarts: warm-up, then the decay, over ``--steps``)."""
    from llava_edge.pretrain.assets import DEMO_ASSETS, LANGUAGE_FILE, load_into, load_weights

    def init(lm) -> None:
        path = Path(DEMO_ASSETS) / LANGUAGE_FILE
        load_into(lm, load_weights(path), "language model", path)

    run.lm_init.insert(0, init)  # before any variant that edits the initial weights


def reply_loss(run: Run) -> None:
    """``reply-loss``: the loss on the replies alone, as a reply weight of 1e6 (a prompt token's
    share vanishes)."""
    run.reply_weight = 1e6


def reply_weight(run: Run, x: str) -> None:
    """``reply-weight=X``: each reply token weighs X times a prompt token in the loss
    (``language.weighted_loss``)."""
    run.reply_weight = float(x)


def lr(run: Run, x: str) -> None:
    run.lr = float(x)


def batch(run: Run, n: str) -> None:
    run.batch_size = int(n)


def seed(run: Run, n: str) -> None:
    """``seed=N``: another draw of the LM's initialisation and batch order, same scenes: the spread
    between draws of one design."""
    run.seed = int(n)


def layers(run: Run, n: str) -> None:
    run.config.text_config.num_hidden_layers = int(n)


def heads(run: Run, spec: str) -> None:
    """``heads=H,KV``: H query heads and KV key/value heads of width hidden/H."""
    h, kv = (int(x) for x in spec.split(","))
    text = run.config.text_config
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = h, kv, text.hidden_size // h


def init(run: Run, x: str) -> None:
    """Weights drawn with standard deviation X (transformers' ``initializer_range``, 0.02 by default)."""
    run.config.text_config.initializer_range = float(x)


def rope_theta(run: Run, x: str) -> None:
    run.config.text_config.rope_parameters = {**(run.config.text_config.rope_parameters or {}), "rope_theta": float(x)}


VARIANTS = {"committed": lambda run: None, "no-drill": lambda run: drop(run, "drill"), "cell-position": cell_position,
            "single-turn": single_turn, "word-embeddings": word_embeddings, "reply-loss": reply_loss,
            "inventory": inventory, "colour-inventory": colour_inventory, "warmup-inventory": warmup_inventory,
            "kind-names": kind_names, "keyed": keyed, "listing": listing, "louder": louder, "embed-init": embed_init, "from-committed": from_committed,
            "reply-weight": reply_weight, "batch": batch, "seed": seed,
            "lr": lr, "drop": drop, "drills": drills, "layers": layers, "heads": heads, "init": init, "rope-theta": rope_theta}


def apply(run: Run, spec: str) -> None:
    for part in spec.split("+"):
        name, _, arg = part.partition("=")
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
        VARIANTS[name](run, *([arg] if arg else []))


def measure(spec: str, steps: int, scenes: int, save: str | None = None) -> dict:
    from transformers import LlamaForCausalLM

    run = Run()
    apply(run, spec)
    saved = language.pretraining_records, language.forward
    language.pretraining_records, language.forward = run.records, run.forward
    try:
        torch.manual_seed(run.seed)
        lm = LlamaForCausalLM(run.config.text_config)
        for init_lm in run.lm_init:
            init_lm(lm)
        started = time.perf_counter()
        losses = language.train_language(
            lm, run.tokenizer, run.tokens, steps=steps, batch_size=run.batch_size,
            lr=run.lr, weight_decay=DEFAULTS.language_weight_decay, warmup=DEFAULTS.warmup,
            world_seed=DEFAULTS.seed, order_seed=run.seed, reply_weight=run.reply_weight)
        seconds = time.perf_counter() - started
    finally:
        language.pretraining_records, language.forward = saved
    if save:
        from llava_edge.pretrain.assets import save_weights

        Path(save).mkdir(parents=True, exist_ok=True)
        save_weights(lm.state_dict(), Path(save) / f"{spec}.safetensors")
    with torch.no_grad():
        images = torch.stack([run.tokens(scene_at(DEFAULTS.seed, "eval", i)) for i in range(scenes)])
        if run.to_embeddings is not None:
            images = run.to_embeddings(lm, images)
    return {"variant": spec, "steps": steps, "scenes": scenes, "final_loss": round(losses[-1], 4),
            "train_seconds": round(seconds), "true tokens": score(lm, run.tokenizer, images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help=f"{', '.join(VARIANTS)}; join with +")
    parser.add_argument("--steps", type=int, default=800, help="LM pretraining steps per variant")
    parser.add_argument("--scenes", type=int, default=300, help="eval scenes scored")
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads)
    parser.add_argument("--save", help="folder to write each variant's LM to (VARIANT.safetensors), for "
                                       "demo_lm_attention.py --lm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.variants:
        print(json.dumps(measure(spec, args.steps, args.scenes, args.save)), flush=True)


if __name__ == "__main__":
    main()
