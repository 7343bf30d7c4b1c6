"""Where the demo recipe loses accuracy: the pretrained LM read three ways, on the same eval questions.

    python benchmarks/demo_ceilings.py --assets llava_edge/assets/demo [--stage1 RUN/stage1] [--scenes 500]

Each line is short-answer exact match (and multiple-choice accuracy) of greedy answers to the eval
split's questions (``eval_records`` of scenes ``0..N-1``, the questions ``eval.json`` holds), with
the vicuna_v1 prompt the trained model gets. What stands where the image goes:

- ``true tokens``: the scene tokens the LM was pretrained on, built from the true annotation (no
  tower, no projector): the LM's own ceiling;
- ``probe tokens``: scene tokens rebuilt from linear probes on the frozen tower's cell features
  (fitted on 1000 training scenes): what any projector could reach from the tower's features;
- ``stage-1 projector`` (with ``--stage1``): the trained projector's outputs, LM frozen as in stage 1.

Used for issue 4's diagnosis (benchmarks/train_demo_report.json, ``history_of_this_recipe``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from transformers import DynamicCache  # noqa: E402

from llava_edge.data.synth import scene_at, eval_records  # noqa: E402
from llava_edge.model.cache import cache_kwargs  # noqa: E402
from llava_edge.model.templates import encode_conversation, get_template  # noqa: E402
from llava_edge.pretrain.assets import (demo_config, load_into, load_language_model, load_tokenizer,  # noqa: E402
                                        load_vision_tower, load_weights)
from llava_edge.pretrain.language import scene_tokens_for  # noqa: E402
from llava_edge.pretrain.probe import fit_probe, probe_inputs  # noqa: E402
from llava_edge.pretrain.vision import image_features  # noqa: E402
from llava_edge.pretrain.world_batches import CELL_CLASSES, scene_batch  # noqa: E402
from llava_edge.train.evaluate import mc_letter, normalise_answer  # noqa: E402


@torch.no_grad()
def greedy_answer(lm, tokenizer, image: torch.Tensor, question: str, max_new_tokens: int = 8) -> str:
    """The LM's greedy reply to one vicuna_v1 question (``<image>`` in it), ``image`` [n_image_tokens, width]
    standing where the image goes."""
    embed = lm.get_input_embeddings()
    encoded = encode_conversation(tokenizer, get_template("vicuna_v1"), [("human", question)],
                                  n_image_tokens=image.shape[0], add_generation_prompt=True)
    ids = torch.tensor([encoded.input_ids])
    step = embed(ids).masked_scatter((ids == tokenizer.image_id).unsqueeze(-1), image.unsqueeze(0))
    cache, reply = DynamicCache(config=lm.config), []
    for _ in range(max_new_tokens):
        out = lm(inputs_embeds=step, use_cache=True, **cache_kwargs(lm, cache))
        token = int(out.logits[0, -1].argmax())
        if token == tokenizer.eos_id:
            break
        reply.append(token)
        step = embed(torch.tensor([[token]]))
    return tokenizer.decode(reply)


@torch.no_grad()
def score(lm, tokenizer, images: torch.Tensor, max_new_tokens: int = 8) -> dict[str, float]:
    """Accuracy per kind and category; ``images`` [N, n_image_tokens, width] for scenes 0..N-1."""
    tally = collections.defaultdict(lambda: [0, 0])
    for i, image in enumerate(images):
        for record in eval_records(scene_at(0, "eval", i), f"eval_{i:06d}.png", 0, i):
            text = greedy_answer(lm, tokenizer, image, record["conversations"][0]["value"], max_new_tokens)
            gold = record["answer"]
            right = (normalise_answer(text) == normalise_answer(gold) if record["kind"] == "short"
                     else mc_letter(text) == gold)
            for key in (record["kind"], f"{record['kind']}/{record['category']}"):
                tally[key][0] += right
                tally[key][1] += 1
    return {k: round(v[0] / v[1], 3) for k, v in sorted(tally.items()) if not k.startswith("mc/")}


def load_lm(assets: str, weights: str | None = None):
    """(tokenizer, the assets' LM in float32 and eval mode), its weights replaced by ``weights`` (a
    ``demo_lm_variants.py --save`` file) when given."""
    tokenizer = load_tokenizer(assets)
    lm = load_language_model(assets, tokenizer).float().eval()
    if weights:
        load_into(lm, load_weights(weights), "language model", weights)
    return tokenizer, lm


def add_lm_arguments(parser) -> None:
    """``--assets`` and ``--lm``, the two arguments :func:`open_lm` reads (with ``--threads``)."""
    parser.add_argument("--assets", default="llava_edge/assets/demo")
    parser.add_argument("--lm", help="a language model's weights (demo_lm_variants.py --save) instead of the assets'")


def open_lm(args):
    """(tokenizer, LM, scene tokens) for ``args.assets`` / ``args.lm``, torch on ``args.threads``."""
    torch.set_num_threads(args.threads)
    tokenizer, lm = load_lm(args.assets, args.lm)
    return tokenizer, lm, scene_tokens_for(demo_config(tokenizer), 0)


def true_tokens(tokens, n: int) -> torch.Tensor:
    return torch.stack([tokens(scene_at(0, "eval", i)) for i in range(n)])


def probe_tokens(tower, tokens, n: int, n_fit: int) -> tuple[torch.Tensor, dict]:
    """Scene tokens from per-cell probe predictions (true background and positions)."""
    fit_x, fit_y = probe_inputs(tower, 0, "train", n_fit)
    test_x, test_y = probe_inputs(tower, 0, "eval", n)
    predicted, right = {}, {}
    for task, classes in CELL_CLASSES.items():
        predict = fit_probe(fit_x[task], fit_y[task], len(classes))
        predicted[task] = predict(test_x[task]).reshape(n, 9)
        right[task] = predicted[task] == test_y[task].reshape(n, 9)
    images = torch.stack([
        tokens.from_cells(*(predicted[t][i] for t in ("color", "shape", "size")), scene_at(0, "eval", i).background)
        for i in range(n)])
    every_cell = torch.stack(list(right.values())).all(dim=0).all(dim=1)
    return images, {"cells_right": {t: round(r.float().mean().item(), 4) for t, r in right.items()},
                    "scenes_all_cells_right": f"{int(every_cell.sum())}/{n}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default="llava_edge/assets/demo")
    parser.add_argument("--stage1", help="a stage-1 output folder trained from these assets")
    parser.add_argument("--scenes", type=int, default=500,
                        help="eval scenes scored (200 read the ceilings 5-7 points high by chance)")
    parser.add_argument("--probe-scenes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlavaForConditionalGeneration

    tokenizer, lm = load_lm(args.assets)
    config = demo_config(tokenizer)
    tokens = scene_tokens_for(config, 0)
    tower = load_vision_tower(args.assets, tokenizer).float()

    report = {"assets": args.assets, "scenes": args.scenes}
    truth = true_tokens(tokens, args.scenes)
    report["true tokens"] = score(lm, tokenizer, truth)
    print(json.dumps({"true tokens": report["true tokens"]}), flush=True)
    images, probes = probe_tokens(tower, tokens, args.scenes, args.probe_scenes)
    report["probe tokens"] = {**probes, **score(lm, tokenizer, images)}
    print(json.dumps({"probe tokens": report["probe tokens"]}), flush=True)
    if args.stage1:
        projector = LlavaForConditionalGeneration.from_pretrained(args.stage1).model.multi_modal_projector.float()
        with torch.no_grad():
            pixels, _ = scene_batch(0, "eval", range(args.scenes), config.vision_config.image_size)
            projected = projector(image_features(tower, pixels))
        geometry = {"output_norm": round(projected.norm(dim=-1).mean().item(), 2),
                    "scene_token_norm": round(truth.norm(dim=-1).mean().item(), 2),
                    "cosine_to_scene_tokens": round(torch.cosine_similarity(projected, truth, dim=-1).mean().item(), 3)}
        report["stage-1 projector"] = {**geometry, **score(lm, tokenizer, projected)}
        print(json.dumps({"stage-1 projector": report["stage-1 projector"]}), flush=True)


if __name__ == "__main__":
    main()
