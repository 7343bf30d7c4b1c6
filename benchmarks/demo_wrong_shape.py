"""Whose place, colour or size does the demo LM give when asked about one shape of several?

    python benchmarks/demo_wrong_shape.py [--assets llava_edge/assets/demo] [--lm LM.safetensors] [--scenes 150]

For every shape of the eval split's first ``--scenes`` scenes, the pretrained LM is asked, from the
true scene tokens (as ``demo_ceilings.py``'s first line), where the shape is, whether it is small or
large and, when its kind occurs once, its colour (the eval's own phrasings, image first). Each answer
is filed by the number of shapes in the scene, the asked shape's rank in reading order and the ranks
of the shapes the answer fits (``asked 1, answer fits 0`` = the place of the scene's first shape given
for its second). A model that looks the named shape up answers along the diagonal; one that reads
a shape found some other way does not, whatever the name.

Used for issue 4's diagnosis (benchmarks/train_demo_report.json, ``history_of_this_recipe``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_ceilings import add_lm_arguments, greedy_answer, open_lm  # noqa: E402
from llava_edge.data.language import _color, _position, _size  # noqa: E402
from llava_edge.data.synth import scene_at  # noqa: E402

ASKED = {"place": (_position, "position"), "size": (_size, "size"), "color": (_color, "color")}


def tally(lm, tokenizer, tokens, n_scenes: int) -> dict:
    """{attribute: {"N shapes": {"asked K": {"fits [ranks]": count}}}}."""
    out: dict = {a: collections.defaultdict(lambda: collections.defaultdict(collections.Counter)) for a in ASKED}
    for i in range(n_scenes):
        scene = scene_at(0, "eval", i)
        image = tokens(scene)
        for k, shape in enumerate(scene.shapes):
            for attribute, (question, field) in ASKED.items():
                if attribute == "color" and scene.count(shape=shape.shape) > 1:
                    continue
                answer = greedy_answer(lm, tokenizer, image, f"<image>\n{question(shape).question}").strip()
                fits = [r for r, other in enumerate(scene.shapes) if getattr(other, field) == answer]
                out[attribute][f"{len(scene.shapes)} shapes"][f"asked {k}"][f"fits {fits}"] += 1
    return json.loads(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lm_arguments(parser)
    parser.add_argument("--scenes", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tokenizer, lm, tokens = open_lm(args)
    with torch.no_grad():
        result = tally(lm, tokenizer, tokens, args.scenes)
    print(json.dumps({"lm": args.lm or args.assets, "scenes": args.scenes, **result}, indent=1))


if __name__ == "__main__":
    main()
