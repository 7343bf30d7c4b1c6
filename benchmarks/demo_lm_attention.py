"""Does the demo LM look a named shape up, and at which token? Its attention to the named shape's patches.

    python benchmarks/demo_lm_attention.py [--assets llava_edge/assets/demo] [--lm LM.safetensors] [--scenes 150]

For every three-shape scene among the eval split's first ``--scenes``, the pretrained LM is asked,
from the true scene tokens (as ``demo_ceilings.py``'s first line), where each shape is (``where is
the red triangle?``), its colour when its kind occurs once (``what color is the triangle?``: keyed
by kind) and its kind when its colour occurs once (``what shape is the red object?``: keyed by
colour). At every token from the image's end to the answer position (the last prompt token) the
script sums, per layer and head, the attention weight on the named shape's patches and on the other
two shapes' patches. A head that looks the shape up puts most of it on the named shape; a head that
only finds shapes splits it about 1 : 2. Printed per question token: ``all`` (named : others over
every head; 0.5 = no preference) and the head with the highest ratio among those putting at least
5% of their weight on shapes.

Last, from the weights alone: layer 0's logit gap, per head, between patches holding the colour
(kind) a query word names and patches holding another (:func:`key_selectivity`).

Used for issue 4's diagnosis: the committed LM looks shapes up by colour (layer 0, heads 0 and 1, at the
colour word: logit gaps 5.9 and 4.4) and by nothing else (no head's kind-keyed gap exceeds 0.4), so questions keyed by kind only (colour of a named kind, count of
a kind) are answered by averaging over all shapes. ``--lm`` scores a language model saved by
``demo_lm_variants.py --save`` instead of the assets' one.
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

from llava_edge.data.language import _color, _position, _shape  # noqa: E402
from llava_edge.data.synth import scene_at  # noqa: E402
from llava_edge.model.templates import encode_conversation, get_template  # noqa: E402


def questions(scene, shape) -> dict:
    """{kind: QA} asked about ``shape``: its place always, its colour/kind where that names it."""
    asks = {"position": _position(shape)}
    if scene.count(shape=shape.shape) == 1:
        asks["color"] = _color(shape)
    if scene.count(color=shape.color) == 1:
        asks["shape"] = _shape(shape)
    return asks


@torch.no_grad()
def attention_to_shapes(lm, tokenizer, tokens, n_scenes: int) -> dict:
    """{kind: {"questions": n, "tokens": [{token, all, best_head, ratio, weight} per question token]}}."""
    template, embed = get_template("vicuna_v1"), lm.get_input_embeddings()
    cell = torch.as_tensor(tokens.cells)
    sums: dict[str, torch.Tensor] = {}  # kind -> [question tokens, layers, heads, 2]
    words: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for i in range(n_scenes):
        scene = scene_at(0, "eval", i)
        if len(scene.shapes) != 3:
            continue
        image = tokens(scene)
        for shape in scene.shapes:
            named = cell == shape.cell[0] * 3 + shape.cell[1]
            others = torch.zeros_like(named)
            for other in scene.shapes:
                if other is not shape:
                    others |= cell == other.cell[0] * 3 + other.cell[1]
            for kind, qa in questions(scene, shape).items():
                encoded = encode_conversation(tokenizer, template, [("human", f"<image>\n{qa.question}")],
                                              n_image_tokens=image.shape[0], add_generation_prompt=True)
                ids = torch.tensor([encoded.input_ids])
                slots = (ids[0] == tokenizer.image_id).nonzero()[:, 0]
                inputs = embed(ids).masked_scatter((ids == tokenizer.image_id).unsqueeze(-1), image.unsqueeze(0))
                attentions = lm(inputs_embeds=inputs, output_attentions=True).attentions
                after = torch.arange(int(slots[-1]) + 1, ids.shape[1])  # the question and the reply prompt
                # [tokens, layers, heads, 64]
                rows = torch.stack([a[0][:, after][..., slots].transpose(0, 1) for a in attentions], 1)
                share = torch.stack([rows[..., named].sum(-1), rows[..., others].sum(-1)], -1)
                # every question of a kind has the same words but for the names: align from the end
                if kind in sums and sums[kind].shape[0] != share.shape[0]:
                    n = min(sums[kind].shape[0], share.shape[0])
                    sums[kind], share = sums[kind][-n:], share[-n:]
                    words[kind] = words[kind][-n:]
                sums[kind] = sums.get(kind, 0) + share
                words.setdefault(kind, [tokenizer.decode([int(t)]) for t in ids[0, after]])
                counts[kind] = counts.get(kind, 0) + 1
    report = {}
    for kind, total in sums.items():
        rows = []
        for word, t in zip(words[kind], total):
            ratio = t[..., 0] / t[..., 1].clamp_min(1e-9)
            on_shapes = t.sum(-1) / counts[kind]
            ratio = torch.where(on_shapes >= 0.05, ratio, torch.zeros_like(ratio))
            layer, head = divmod(int(ratio.argmax()), ratio.shape[1])
            rows.append({"token": word, "all": round(float(t[..., 0].sum() / t[..., 1].sum()), 3),
                         "best_head": f"layer {layer} head {head}", "ratio": round(float(ratio.max()), 2),
                         "weight_on_shapes": round(float(on_shapes[layer, head]), 3)})
        report[kind] = {"questions": counts[kind], "tokens": rows}
    return report


@torch.no_grad()
def key_selectivity(lm, tokenizer, tokens) -> dict:
    """Layer 0's preference, per head, for patches holding the attribute its query word names.

    For every colour word (and every kind word), the logit a head gives a patch with that colour
    (kind) minus the logit it gives a patch with another one, averaged over the other attribute's
    values; the patch's size is "small", its background and position the tables' means. From the
    weights alone (q and k projections, no RoPE): a look-up head shows a gap of several logits."""
    from llava_edge.data.world import COLORS, SHAPES

    layer = lm.model.layers[0]
    attn, norm, config = layer.self_attn, layer.input_layernorm, lm.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    width = config.hidden_size // heads
    embed = lm.get_input_embeddings().weight
    rest = tokens.size[1] + tokens.background.mean(0) + tokens.position.mean(0)

    def gaps(words, table, other) -> list[float]:
        n = len(words)  # table rows 1..n are the words' (row 0 is "no shape")
        # keys [n, other's values, heads, width] of patches holding attribute b and other's value o
        patches = table[1:, None] + other[None, 1:] + rest
        keys = attn.k_proj(norm(patches)).view(n, -1, kv, width).repeat_interleave(heads // kv, 2)
        ids = [tokenizer.encode(" " + word)[0] for word in words]
        queries = attn.q_proj(norm(embed[ids])).view(n, heads, width)
        # logits [query word a, attribute b, heads], averaged over the other attribute's values
        logits = torch.einsum("ahd,bohd->abh", queries, keys) / keys.shape[1] / width ** 0.5
        same = logits.diagonal().T  # [n, heads]
        others = (logits.sum(1) - same) / (n - 1)
        return [round(x, 2) for x in (same - others).mean(0).tolist()]

    return {"colour_keyed": gaps(COLORS, tokens.color, tokens.shape), "kind_keyed": gaps(SHAPES, tokens.shape, tokens.color)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lm_arguments(parser)
    parser.add_argument("--scenes", type=int, default=150, help="eval scenes looked at (the three-shape ones are used)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    tokenizer, lm, tokens = open_lm(args)
    lm.set_attn_implementation("eager")  # the fused kernels return no attention weights
    report = {"assets": args.assets, "lm": args.lm or "the assets'", "scenes": args.scenes,
              **attention_to_shapes(lm, tokenizer, tokens, args.scenes)}
    for kind, entry in report.items():
        if not isinstance(entry, dict) or "tokens" not in entry:
            continue
        print(f"{kind} ({entry['questions']} questions)")
        for row in entry["tokens"]:
            print(f"  {row['token']!r:14} all {row['all']:.2f}   best {row['best_head']}: "
                  f"{row['ratio']:.2f} ({row['weight_on_shapes']:.2f} of its weight on shapes)")
    report["layer 0 key selectivity"] = key_selectivity(lm, tokenizer, tokens)
    for key, per_head in report["layer 0 key selectivity"].items():
        print(f"layer 0, {key.replace('_', ' ')}: logit gap per head {per_head}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
