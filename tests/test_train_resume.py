"""Checkpoints: a run SIGKILLed mid-training resumes and continues exactly; broken ones are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llava_edge.train import checkpoint as ckpt
from llava_edge.train import train

# Stage 2 full fine-tuning of the tiny preset: the LLM and projector train, so the optimizer state
# is most of the checkpoint. 6 optimizer steps of 4 samples (2 per micro-batch x 2 accumulated).
# One thread: on a shared 2-core machine it is several times faster than two for a model this small.
RUN = dict(global_batch_size=4, per_device_batch_size=2, max_steps=6, save_steps=2, save_total_limit=2,
           precision="fp32", gradient_checkpointing=False, learning_rate=1e-3, threads=1, progress=False)

# The run that gets killed: the same train() call in a child process, slowed down after each step so
# that the parent can kill it between checkpoints.
KILLED_RUN = """
import json, sys, time
from transformers import TrainerCallback
from llava_edge.train import train

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(1.0)

model, data, out, run = sys.argv[1:5]
train(2, model, data, out, callbacks=(Slow(),), **json.loads(run))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_edge.data.synth import synth

    # 4 scenes -> 16 stage-2 records -> 4 steps per epoch: the resumed run crosses an epoch boundary.
    return synth(tmp_path_factory.mktemp("world") / "w", n=4, seed=0, image_size=32, n_eval=1).out_dir


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "model"
    return train(2, tiny_model_dir, world / "stage2.json", out, **RUN)


def test_sigkilled_run_resumes_exactly(tiny_model_dir, world, uninterrupted, tmp_path):
    out = tmp_path / "model"
    run = {k: v for k, v in RUN.items()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tiny_model_dir), str(world / "stage2.json"),
                              str(out), json.dumps(run)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    run_dir = tmp_path / "model.run"
    deadline = time.time() + 120
    try:
        while not ckpt.list_checkpoints(run_dir):
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run_dir)]
    assert killed_at and max(killed_at) < RUN["max_steps"], "the child finished before it was killed"
    assert not out.exists(), "a killed run must not leave a final model"

    resumed = train(2, tiny_model_dir, world / "stage2.json", out, **RUN)
    assert resumed.resumed_from is not None
    assert int(resumed.resumed_from.name.split("-")[1]) == max(killed_at)
    assert [h["step"] for h in resumed.history] == list(range(1, RUN["max_steps"] + 1))
    assert resumed.history[-1]["epoch"] == 1.5
    # Same process count, same CPU kernels, same data order and RNG: the losses are bit-identical.
    assert resumed.losses == uninterrupted.losses

    from safetensors.torch import load_file

    a = load_file(uninterrupted.out / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_checkpoint_holds_training_state_and_manifest(uninterrupted):
    newest = ckpt.list_checkpoints(uninterrupted.run_dir)
    assert [p.name for p in newest] == ["checkpoint-00000006", "checkpoint-00000004"]  # save_total_limit 2
    info = ckpt.verify_checkpoint(newest[0])
    assert info.global_step == 6
    assert info.manifest["samples_seen"] == 6 * RUN["global_batch_size"]
    files = set(info.manifest["files"])
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    state = json.loads((newest[0] / "trainer_state.json").read_text())
    assert state["global_step"] == 6


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_corrupt_checkpoint_is_detected_not_loaded(uninterrupted, tmp_path, damage):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted.run_dir / "checkpoints", run_dir / "checkpoints")
    newest, older = ckpt.list_checkpoints(run_dir)
    target = newest / "optimizer.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match=newest.name):
        ckpt.verify_checkpoint(newest)
    warnings = []
    assert ckpt.latest_valid(run_dir, warn=warnings.append).path == older
    assert len(warnings) == 1 and newest.name in warnings[0]


def test_explicit_corrupt_checkpoint_is_refused(tiny_model_dir, world, uninterrupted, tmp_path):
    import shutil

    broken = tmp_path / "checkpoint-00000006"
    shutil.copytree(ckpt.list_checkpoints(uninterrupted.run_dir)[0], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        train(2, tiny_model_dir, world / "stage2.json", tmp_path / "out", resume=broken, **RUN)


def test_resume_with_a_different_recipe_is_refused(tiny_model_dir, world, uninterrupted, tmp_path):
    import shutil

    from llava_edge.errors import UserError

    run_dir = tmp_path / "out.run"
    shutil.copytree(uninterrupted.run_dir, run_dir)
    with pytest.raises(UserError, match="learning_rate"):
        train(2, tiny_model_dir, world / "stage2.json", tmp_path / "out", **{**RUN, "learning_rate": 5e-4})


def test_staging_leftovers_are_never_loaded(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "staging" / "checkpoint-9").mkdir(parents=True)
    assert ckpt.latest_valid(run_dir) is None


def test_lora_run_resumes_exactly_from_its_adapter_checkpoint(tiny_model_dir, world, tmp_path):
    """The adapter path of resuming (PEFT weights + projector copy), simulated crash after step 2."""
    import shutil

    lora = dict(RUN, tune="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=4, learning_rate=1e-2)
    first = train(2, tiny_model_dir, world / "stage2.json", tmp_path / "a", **lora)
    newest = ckpt.list_checkpoints(first.run_dir)[0]
    assert newest.name.endswith("04") and (newest / "adapter_model.safetensors").is_file()
    shutil.rmtree(newest)  # as if killed before step 4's checkpoint was published
    shutil.rmtree(first.out)
    again = train(2, tiny_model_dir, world / "stage2.json", tmp_path / "a", **lora)
    assert again.resumed_from.name.endswith("02")
    assert again.losses == first.losses
