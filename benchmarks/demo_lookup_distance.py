"""Does the demo LM learn a look-up by name when the answer sits right after the name, and when it sits further on?

    python benchmarks/demo_lookup_distance.py none is-at-the is-found-at-the-spot --steps 800 [--threads 1]
    python benchmarks/demo_lookup_distance.py none+is-at-the --steps 800    # both listings, the last scored

For each filler, a fresh demo LM is pretrained (``pretrain.language.train_language``, the committed
settings) on a single record per training scene: the scene's shapes listed in a random order, each
named by colour and kind, then the filler, then its place (``red circle is at the top left; blue
square is at the center.``). Nothing else: the listing is the only text, so the one thing to learn is
the look-up. Every ``--every`` steps the script scores, teacher-forced on held-out eval scenes, the
place's first token right after each name and filler, in scenes of two or three shapes, beside
``guess``: what answering with a shape of the scene drawn at random would score (a model that finds
the shapes but not the named one).

The filler sets how many tokens stand between the name and the answer: 0, or 3 with ``is at the``,
the distance of the world's questions (``where is the red circle? ASSISTANT: top left``: ``?``,
`` ASSISTANT`` and ``:`` between them). Fillers joined with ``+`` give one listing per filler and
scene, and the last one is scored: does learning the look-up next to the name speed it up further
on? Used for issue 4's diagnosis of why the demo LM answers a
named shape's place and colour like a guess among the scene's shapes (benchmarks/train_demo_report.json,
``history_of_this_recipe``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava_edge.pretrain.language as language  # noqa: E402
from demo_lm_variants import DEFAULTS, Run  # noqa: E402
from llava_edge.data.records import GPT, HUMAN, IMAGE_TOKEN, to_json_record  # noqa: E402
from llava_edge.data.synth import scene_at  # noqa: E402
from llava_edge.model.templates import encode_conversation, get_template  # noqa: E402

FILLERS = {"none": "", "is-at-the": " is at the", "is-found-at-the-spot": " is found at the spot"}
PROMPT = "list the shapes and their places."


def listing(scene, rng: random.Random, filler: str) -> list[tuple[str, str]]:
    """[(name and filler, place)] of the scene's shapes in ``rng``'s order."""
    return [(f"{s.color} {s.shape}{filler}", s.position) for s in rng.sample(scene.shapes, len(scene.shapes))]


def records_with(fillers: list[str]):
    """``pretraining_records`` that give only a listing per filler, the image before the prompt."""
    def records(scene, image, seed, i):
        out = []
        for k, filler in enumerate(fillers):
            items = listing(scene, random.Random(f"listing:{i}" + (f":{k}" if k else "")), filler)
            text = "; ".join(f"{key} {place}" for key, place in items) + "."
            turns = [(HUMAN, f"{IMAGE_TOKEN}\n{PROMPT}"), (GPT, text)]
            out.append((language.STAGE2_TEMPLATE, to_json_record(f"{image[:-4]}_listing{k}", image, turns)))
        return out
    return records


@torch.no_grad()
def score(lm, run: Run, filler: str, n_scenes: int) -> dict:
    """Teacher-forced accuracy of each place's first token after its name, scenes of 2-3 shapes."""
    tok, template = run.tokenizer, get_template(language.STAGE2_TEMPLATE)
    right = guess = count = 0
    was_training = lm.training
    lm.eval()
    for i in range(n_scenes):
        scene = scene_at(DEFAULTS.seed, "eval", i)
        if len(scene.shapes) < 2:
            continue
        items = listing(scene, random.Random(f"eval-listing:{i}"), filler)
        ids = list(encode_conversation(tok, template, [(HUMAN, f"{IMAGE_TOKEN}\n{PROMPT}")],
                                       n_image_tokens=len(run.tokens.cells), add_generation_prompt=True).input_ids)
        first = {place: tok.encode(" " + place)[0] for _, place in items}
        targets = []
        for k, (key, place) in enumerate(items):
            ids += tok.encode(("; " if k else " ") + key)  # the reply's first word has its space, as in training
            targets.append((len(ids) - 1, first[place]))
            ids += tok.encode(" " + place)
        x = torch.tensor([ids])
        embeds = lm.get_input_embeddings()(x).masked_scatter((x == tok.image_id).unsqueeze(-1),
                                                             run.tokens(scene).unsqueeze(0))
        predicted = lm(inputs_embeds=embeds).logits[0].argmax(-1)
        for position, want in targets:
            right += int(predicted[position]) == want
            guess += sum(first[place] == want for _, place in items) / len(items)
            count += 1
    lm.train(was_training)
    return {"accuracy": round(right / count, 3), "guess": round(guess / count, 3), "names": count}


def measure(name: str, steps: int, every: int, n_scenes: int) -> None:
    from transformers import LlamaForCausalLM

    run = Run()
    fillers = [FILLERS[part] for part in name.split("+")]
    filler = fillers[-1]  # the one scored
    gap = len(run.tokenizer.encode(f"red circle{filler}")) - len(run.tokenizer.encode("red circle"))
    saved, language.pretraining_records = language.pretraining_records, records_with(fillers)
    try:
        torch.manual_seed(run.seed)
        lm = LlamaForCausalLM(run.config.text_config)
        started, losses = time.perf_counter(), []

        def report(step: int, loss: float) -> None:
            losses.append(loss)
            if (step + 1) % every == 0 or step + 1 == steps:
                recent = losses[-every:]
                print(json.dumps({"filler": name, "tokens_between": gap, "step": step + 1,
                                  "loss": round(sum(recent) / len(recent), 4),
                                  "seconds": round(time.perf_counter() - started),
                                  **score(lm, run, filler, n_scenes)}), flush=True)

        language.train_language(lm, run.tokenizer, run.tokens, steps=steps, batch_size=run.batch_size, lr=run.lr,
                                weight_decay=DEFAULTS.language_weight_decay, warmup=DEFAULTS.warmup,
                                world_seed=DEFAULTS.seed, order_seed=run.seed, reply_weight=run.reply_weight,
                                on_step=report)
    finally:
        language.pretraining_records = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fillers", nargs="+", help=f"{', '.join(FILLERS)}; join with + to train on several")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=200, help="score every N steps")
    parser.add_argument("--scenes", type=int, default=300, help="eval scenes scored (those of 2-3 shapes count)")
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads)
    args = parser.parse_args()
    unknown = {part for name in args.fillers for part in name.split("+")} - set(FILLERS)
    if unknown:
        parser.error(f"unknown filler {sorted(unknown)}; expected {', '.join(FILLERS)}")
    torch.set_num_threads(args.threads)
    for name in args.fillers:
        measure(name, args.steps, args.every, args.scenes)


if __name__ == "__main__":
    main()
