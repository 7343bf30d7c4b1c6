"""Pretrained demo components: the small CLIP and Vicuna stand-ins of the demo's LLaVA recipe.

Nothing can be downloaded here, so the demo carries its own components, pretrained on the synthetic
world with the ``demo`` preset's sizes (see ``python -m llava_edge.pretrain.demo --help``):

- ``vision.py``   a CLIP ViT tower trained to make its layer -2 patch features (what LLaVA feeds the
                  projector) predict the scene's symbolic annotation;
- ``probe.py``    the linear probe that measures what those frozen features carry;
- ``language.py`` a Llama LM trained on the world's conversations laid out by the chat templates;
- ``assets.py``   the committed files (``llava_edge/assets/demo``) and their loaders;
- ``base.py``     :func:`build_demo_base`: tower + LM + a random projector as a LLaVA checkpoint,
                  the starting point of the two-stage recipe.
"""

from llava_edge.pretrain.assets import DEMO_ASSETS

__all__ = ["DEMO_ASSETS", "build_demo_base"]


def __getattr__(name: str):
    # build_demo_base imports torch and transformers; keep `import llava_edge.pretrain` light.
    if name == "build_demo_base":
        from llava_edge.pretrain.base import build_demo_base

        return build_demo_base
    raise AttributeError(name)
