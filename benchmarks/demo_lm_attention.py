"""Does the demo LM look a named shape up? Its attention to the named shape's patches, per head.

    python benchmarks/demo_lm_attention.py [--assets llava_edge/assets/demo] [--scenes 150]

For every three-shape scene among the eval split's first ``--scenes``, the pretrained LM is asked,
from the true scene tokens (as ``demo_ceilings.py``'s first line), where each shape is (``where is
the red triangle?``) and, when its kind occurs once, its colour (``what color is the triangle?``).
For each layer and head, the script averages the attention weight that the answer position (the
last prompt token) puts on the named shape's patches and on the other two shapes' patches. A head
that looks the shape up puts most of it on the named shape; a head that only finds shapes splits it
about 1 : 2 (``named_to_others`` near 0.5 over all heads). A diagnostic for issue 4 (why colour and place stay the weakest look-ups), not a test.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from llava_edge.data.language import _color, _position  # noqa: E402
from llava_edge.data.synth import scene_at  # noqa: E402
from llava_edge.model.templates import encode_conversation, get_template  # noqa: E402
from llava_edge.pretrain.assets import demo_config, load_language_model, load_tokenizer  # noqa: E402
from llava_edge.pretrain.language import scene_tokens_for  # noqa: E402


@torch.no_grad()
def attention_to_shapes(lm, tokenizer, tokens, n_scenes: int) -> dict:
    """{question kind: {"questions": n, "layer L": [[named, others] per head]}}."""
    template, embed = get_template("vicuna_v1"), lm.get_input_embeddings()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for i in range(n_scenes):
        scene = scene_at(0, "eval", i)
        if len(scene.shapes) != 3:
            continue
        image = tokens(scene)
        for shape in scene.shapes:
            asks = {"position": _position(shape)}
            if scene.count(shape=shape.shape) == 1:
                asks["color"] = _color(shape)
            for kind, qa in asks.items():
                encoded = encode_conversation(tokenizer, template, [("human", f"<image>\n{qa.question}")],
                                              n_image_tokens=image.shape[0], add_generation_prompt=True)
                ids = torch.tensor([encoded.input_ids])
                slots = (ids[0] == tokenizer.image_id).nonzero()[:, 0]
                inputs = embed(ids).masked_scatter((ids == tokenizer.image_id).unsqueeze(-1), image.unsqueeze(0))
                attentions = lm(inputs_embeds=inputs, output_attentions=True).attentions
                cell = torch.as_tensor(tokens.cells)
                named = cell == shape.cell[0] * 3 + shape.cell[1]
                others = torch.zeros_like(named)
                for other in scene.shapes:
                    if other is not shape:
                        others |= cell == other.cell[0] * 3 + other.cell[1]
                # [layers, heads, 2]: weight on the named shape's patches, on the others'
                rows = torch.stack([a[0, :, -1, slots] for a in attentions])
                share = torch.stack([rows[..., named].sum(-1), rows[..., others].sum(-1)], -1)
                sums[kind] = sums.get(kind, 0) + share
                counts[kind] = counts.get(kind, 0) + 1
    return {kind: {"questions": counts[kind],
                   # over all heads: 0.5 when the named shape gets no more than each other shape
                   "named_to_others": round(float(total[..., 0].sum() / total[..., 1].sum()), 3),
                   **{f"layer {layer}": [[round(x, 3) for x in head] for head in (total / counts[kind])[layer].tolist()]
                      for layer in range(total.shape[0])}}
            for kind, total in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default="llava_edge/assets/demo")
    parser.add_argument("--scenes", type=int, default=150, help="eval scenes looked at (the three-shape ones are used)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.assets)
    lm = load_language_model(args.assets, tokenizer).float().eval()
    lm.set_attn_implementation("eager")  # the fused kernels return no attention weights
    tokens = scene_tokens_for(demo_config(tokenizer), 0)
    report = {"assets": args.assets, "scenes": args.scenes,
              "read_as": "[weight on the named shape's patches, weight on the other two shapes' patches] per head, "
                         "from the answer position",
              **attention_to_shapes(lm, tokenizer, tokens, args.scenes)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
