"""The demo's starting checkpoint: pretrained tower and LM, a fresh projector, the committed tokenizer.

LLaVA starts from CLIP + Vicuna + a randomly initialised projector; :func:`build_demo_base` builds the
same starting point from the demo assets, as a ``save_checkpoint`` folder the trainer loads.
"""

from __future__ import annotations

from pathlib import Path

from llava_edge.pretrain.assets import (
    DEMO_ASSETS,
    LANGUAGE_FILE,
    PRESET,
    VISION_FILE,
    load_into,
    load_tokenizer,
    load_weights,
    read_record,
)


def build_demo_base(out_dir: str | Path, seed: int = 0, assets: str | Path = DEMO_ASSETS) -> Path:
    """Write a LLaVA checkpoint folder (``save_checkpoint`` layout) to ``out_dir`` and return it.

    Vision tower and language model (``model.language_model`` + ``lm_head``) come from ``assets``
    (fp16 files, upcast to fp32); the projector is randomly initialised, deterministically for
    ``seed``. The tokenizer is the committed ``tokenizer.json``, never a retrained one. The sidecar
    (``llava_edge.json``) records the preset, seed and the sha256 of the asset files used.
    """
    from llava_edge.model.build import build_model, save_checkpoint

    assets = Path(assets)
    record = read_record(assets)  # also checks every file against the sha256 it was written with
    tokenizer = load_tokenizer(assets)
    model = build_model(PRESET, tokenizer, seed=seed)
    load_into(model.model.vision_tower, load_weights(assets / VISION_FILE), "vision tower",
              assets / VISION_FILE)
    language = load_weights(assets / LANGUAGE_FILE)
    lm_head = {"weight": language.pop("lm_head.weight")} if "lm_head.weight" in language else {}
    body = {k.removeprefix("model."): v for k, v in language.items()}
    load_into(model.model.language_model, body, "language model", assets / LANGUAGE_FILE)
    load_into(model.lm_head, lm_head, "language model head", assets / LANGUAGE_FILE)
    extra = {"preset": PRESET, "seed": seed,
             "pretrained": {"assets": str(assets), "files": record.get("files", {}),
                            "pretrain_seed": record.get("seed")}}
    return save_checkpoint(model.eval(), tokenizer, out_dir, extra=extra)
