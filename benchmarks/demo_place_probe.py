"""Where in the demo LM is a named shape's place linearly readable, and whose place is it?

    python benchmarks/demo_place_probe.py [--assets llava_edge/assets/demo] [--lm W.safetensors] [--question-first]

Asks ``where is the COLOR KIND?`` about every shape of the 2-3-shape scenes (true scene tokens, the
image before the question as the eval asks it, or after it with ``--question-first``; vicuna_v1
generation prompt) and takes the LM's hidden state after each layer at the colour word, the kind
word, ``?`` and the last prompt token (where the answer's first token is predicted). At each of
those, two linear probes (9 places; L-BFGS, fitted on ``--train-scenes`` training scenes, scored on
``--eval-scenes`` held-out ones) read

- ``named``: the place of the shape the question names (what the answer needs);
- ``first``: the place of the scene's first shape in reading order, whatever is named.

Both are the same place in about 41% of the questions (printed as ``named_is_first``), so a
``named`` figure near that with a high ``first`` means the LM carries one shape's place and ignores
the name. Used for issue 4 (benchmarks/train_demo_report.json, ``history_of_this_recipe``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_ceilings import add_lm_arguments, open_lm  # noqa: E402
from llava_edge.data.synth import scene_at  # noqa: E402
from llava_edge.data.world import POSITIONS  # noqa: E402
from llava_edge.model.templates import encode_conversation, get_template  # noqa: E402

PLACES = sorted(POSITIONS.values())
WHERE = ("colour", "kind", "?", "last")


@torch.no_grad()
def hidden_states(lm, tokenizer, tokens, split: str, n: int, question_first: bool):
    """([N, layers + 1, len(WHERE), width] states, [N] named places, [N] first shapes' places)."""
    template, embed = get_template("vicuna_v1"), lm.get_input_embeddings()
    (mark,) = tokenizer.encode("?")
    states, named, first = [], [], []
    for i in range(n):
        scene = scene_at(0, split, i)
        if len(scene.shapes) < 2:
            continue
        image = tokens(scene)
        for shape in scene.shapes:
            question = f"where is the {shape.color} {shape.shape}?"
            text = f"{question}\n<image>" if question_first else f"<image>\n{question}"
            ids = encode_conversation(tokenizer, template, [("human", text)], n_image_tokens=image.shape[0],
                                      add_generation_prompt=True).input_ids
            # the question's '?': the first one after the image, or the first of all with the question first
            image_at = ids.index(tokenizer.image_id)
            at = ids.index(mark) if question_first else ids.index(mark, image_at)
            x = torch.tensor([ids])
            embeds = embed(x).masked_scatter((x == tokenizer.image_id).unsqueeze(-1), image.unsqueeze(0))
            layers = torch.stack(lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states)[:, 0]
            states.append(layers[:, [at - 2, at - 1, at, len(ids) - 1]])
            named.append(PLACES.index(shape.position))
            first.append(PLACES.index(scene.shapes[0].position))
    return torch.stack(states), torch.tensor(named), torch.tensor(first)


def probe(x, y, x_test, y_test) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, small L2)."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    x, x_test = (x - mean) / std, (x_test - mean) / std
    w = torch.zeros(x.shape[1], len(PLACES), requires_grad=True)
    b = torch.zeros(len(PLACES), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return round(float(((x_test @ w + b).argmax(1) == y_test).float().mean()), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lm_arguments(parser)
    parser.add_argument("--question-first", action="store_true", help="the question before the image")
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--eval-scenes", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    tokenizer, lm, tokens = open_lm(args)
    x, y, f = hidden_states(lm, tokenizer, tokens, "train", args.train_scenes, args.question_first)
    xt, yt, ft = hidden_states(lm, tokenizer, tokens, "eval", args.eval_scenes, args.question_first)
    out = {"questions": [len(y), len(yt)], "named_is_first": round(float((yt == ft).float().mean()), 3)}
    for layer in range(x.shape[1]):
        for k, where in enumerate(WHERE):
            out[f"layer {layer} at {where}"] = {"named": probe(x[:, layer, k], y, xt[:, layer, k], yt),
                                                "first": probe(x[:, layer, k], f, xt[:, layer, k], ft)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
