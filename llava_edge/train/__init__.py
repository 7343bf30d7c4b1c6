"""The two-stage LLaVA training recipe (stage 1: projector; stage 2: projector + LLM, full or LoRA).

>>> from llava_edge.train import train, evaluate
>>> train(1, "runs/base", "runs/world/stage1.json", "runs/stage1", recipe="configs/demo-stage1.toml")
>>> train(2, "runs/stage1", "runs/world/stage2.json", "runs/stage2", recipe="configs/demo-stage2.toml")
>>> evaluate("runs/stage2", "runs/world/eval.json")

Importing this package is cheap: torch and transformers load when a function runs.
"""

from llava_edge.train.evaluate import evaluate
from llava_edge.train.recipe import Recipe, load_recipe
from llava_edge.train.run import TrainResult, train

__all__ = ["Recipe", "TrainResult", "evaluate", "load_recipe", "train"]
