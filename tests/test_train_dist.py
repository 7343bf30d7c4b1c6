"""The shipped accelerate configs on CPU, 2 processes (gloo): DDP, FSDP and DeepSpeed ZeRO-2/3 train
what 1 process does.

Same recipe, same global batch (8 = 2 per micro-batch x 2 processes x 2 accumulated, against
2 x 1 x 4 in one process), same data at every step (the sampler groups per global batch). The
micro-batches differ in composition and padding, so float32 sums run in another order: losses and
weights agree to rounding, not bit for bit. Tolerance 1e-5 (relative) on losses and 1e-5 on weights,
measured differences about 1e-7 (DeepSpeed ZeRO-2 and ZeRO-3 too: 8e-8 on losses, 6e-8 on weights).

DeepSpeed runs on CPU through its CPU accelerator with gloo; its first use compiles a small
shared-memory op (about a minute, cached in ~/.cache/torch_extensions). Where DeepSpeed is not
installed those tests skip and say so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llava_edge.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
RUN = dict(global_batch_size=8, per_device_batch_size=2, max_steps=3, save_steps=3, precision="fp32",
           gradient_checkpointing=False, learning_rate=1e-3, threads=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_edge.data.synth import synth

    return synth(tmp_path_factory.mktemp("world") / "w", n=16, seed=0, image_size=32, n_eval=2).out_dir


@pytest.fixture(scope="module")
def single(tiny_model_dir, world, tmp_path_factory):
    return train(2, tiny_model_dir, world / "stage2.json", tmp_path_factory.mktemp("single") / "m",
                 progress=False, **RUN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, model, world, out: Path, timeout: int = 300) -> dict:
    sets = [arg for k, v in RUN.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "llava_edge.train", "--stage", "2", "--model", str(model), "--data", str(world / "stage2.json"),
           "--out", str(out), "--no-progress", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}
    # The accelerate configs name their DeepSpeed JSON relative to the repository root, as the
    # documented commands run from there.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=CONFIGS.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out.with_name(out.name + ".run") / "history.json").read_text())


def _assert_same_training(single, history: dict, out: Path) -> None:
    from safetensors.torch import load_file

    losses = [h["loss"] for h in history["history"]]
    assert len(losses) == len(single.losses) == RUN["max_steps"]
    for a, b in zip(losses, single.losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, single.losses)
    a, b = load_file(out / "model.safetensors"), load_file(single.out / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_ddp_two_processes_match_one(tiny_model_dir, world, single, tmp_path):
    out = tmp_path / "ddp"
    history = _launch("ddp.yaml", tiny_model_dir, world, out)
    _assert_same_training(single, history, out)
    files = {p.name for p in (tmp_path / "ddp.run" / "checkpoints").rglob("*")}
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= files


def test_fsdp_two_processes_match_one(tiny_model_dir, world, single, tmp_path):
    out = tmp_path / "fsdp"
    history = _launch("fsdp.yaml", tiny_model_dir, world, out)
    _assert_same_training(single, history, out)
    # Really sharded (accelerate alone would have run DDP on CPU; see llava_edge/train/compat.py):
    # the checkpoint holds one shard file per process for the model and for the optimizer.
    checkpoint = next((tmp_path / "fsdp.run" / "checkpoints").iterdir())
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (checkpoint / "optimizer_0").is_dir() and not (checkpoint / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_match_one(tiny_model_dir, world, single, tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'llava-edge[deepspeed]')")
    out = tmp_path / f"zero{stage}"
    history = _launch(f"deepspeed-zero{stage}.yaml", tiny_model_dir, world, out, timeout=600)
    _assert_same_training(single, history, out)
    # DeepSpeed's own checkpoint layout (per-rank optimizer shards), published with our manifest.
    checkpoint = next((tmp_path / f"zero{stage}.run" / "checkpoints").iterdir())
    shards = sorted(p.name for p in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert (checkpoint / "manifest.json").is_file()
