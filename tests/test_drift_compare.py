"""Drift end to end on the tiny model: torch fp32 against fp16, bf16 and a really broken copy; the
exit codes, the written report, the Python API, the pytest fixture, and a non-torch runtime.

What random tiny weights allow us to assert, and why. Their logits are nearly flat (std ~0.16 nats
over 512 tokens), so every KL is small in absolute terms: skipping a whole decoder layer moves the
mean KL by only ~2e-3 nats/token, far below any sensible KL gate. Top-1 agreement does not depend
on the logit scale: the broken copy keeps the reference's top token at ~45% of positions, fp16 at
>99%. So on the tiny model the default thresholds catch the broken copy through ``min_top1``; the
KL gates are shown to work on a "sharpened" copy whose lm_head is scaled so that logits spread like
a trained model's. Accuracy is exercised with a scripted numpy runtime (random weights answer
nothing correctly), which also proves the suite needs nothing but the runtime protocol.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_edge.drift import DriftExceeded, DriftReport, compare, drift
from llava_edge.drift.pytest_plugin import DriftSession

REPO = Path(__file__).resolve().parents[1]
N_TOKENS = 12  # greedy reply length: enough positions for stable rates, cheap on 2 cores


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: torch's second thread costs more than it gives. On this shared 2-core machine
    (load ~8) 4 drift items took 12.4 s with 2 threads and 0.64 s with 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a model folder with its safetensors weights changed by ``edit(tensors)``."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return dst


def zero_decoder_layer(tensors: dict, layer: int = 1) -> None:
    names = [k for k in tensors if k.startswith(f"language_model.model.layers.{layer}.")]
    assert len(names) == 9, names  # 4 attention, 3 MLP, 2 norm weights
    for k in names:
        tensors[k] = np.zeros_like(tensors[k])


def sharpen(tensors: dict) -> None:
    # x25 turns the random init's logit std of ~0.16 nats into ~4, the spread of a trained LM.
    tensors["language_model.lm_head.weight"] = tensors["language_model.lm_head.weight"] * 25


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from llava_edge.data.synth import synth

    out = tmp_path_factory.mktemp("drift") / "world"
    synth(out, n=0, n_eval=6, image_size=32)  # 12 records: 6 short answers, 6 multiple choice
    return out


@pytest.fixture(scope="module")
def broken_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _edited_copy(tiny_model_dir, tmp_path_factory.mktemp("drift") / "broken", zero_decoder_layer)


@pytest.fixture(scope="module")
def report(tiny_model_dir, broken_dir, world) -> DriftReport:
    tiny = tiny_model_dir
    return compare(f"torch:{tiny}", [f"fp16=torch:{tiny}?dtype=float16", f"bf16=torch:{tiny}?dtype=bfloat16",
                                     f"broken=torch:{broken_dir}"], world, max_new_tokens=N_TOKENS)


# --- torch fp32 vs fp16 / bf16 / broken --------------------------------------------------------------
def test_default_thresholds_pass_fp16_and_bf16_and_catch_the_broken_decoder(report):
    assert report.n_items == 12
    assert [(v.candidate, v.limit) for v in report.check()] == [("broken", "min_top1")]
    assert report["broken"].metrics["e2e.top1"] < 0.7
    # fp16 rounding flips a near-tie now and then on flat logits; 0.95 leaves room for a few flips.
    assert report["fp16"].metrics["e2e.top1"] >= 0.95
    assert report["broken"].metrics["generation.exact_match"] < report["fp16"].metrics["generation.exact_match"]


def test_drift_grows_with_lost_precision(report):
    kl = {label: report[label].metrics["e2e.kl_mean"] for label in ("fp16", "bf16", "broken")}
    # fp16 keeps 10 mantissa bits, bf16 7: bf16 strays ~60x further here; a dropped layer far more.
    assert 0 < kl["fp16"] < kl["bf16"] < kl["broken"]
    assert report["fp16"].metrics["image.max_abs"] > 0


def test_rerun_noise_floor_is_exactly_zero_on_cpu(report):
    floor = report.floor.metrics
    assert report.floor.role == "floor" and report.settings["floor"].endswith("(rerun)")
    assert floor["e2e.kl_mean"] == 0 and floor["image.max_abs"] == 0 and floor["e2e.top1"] == 1
    assert floor["generation.exact_match"] == 1


def test_attribution_puts_a_decoder_defect_on_the_decoder(report):
    broken, fp16 = report["broken"].metrics, report["fp16"].metrics
    # Its vision weights are untouched: bit-identical image embeddings, no vision-side drift at all.
    assert broken["image.max_abs"] == 0 and broken["image.cosine_min"] == pytest.approx(1, abs=1e-12)
    assert broken["vision_only.kl_mean"] == 0
    assert broken["decoder_only.kl_mean"] == broken["e2e.kl_mean"] > 0
    # fp16 drifts on both sides; the split measures each (the vision side is far smaller here).
    assert 0 < fp16["vision_only.kl_mean"] < fp16["decoder_only.kl_mean"]


def test_logits_are_compared_on_the_reference_reply(report, tiny_model_dir, broken_dir, world):
    """Recompute the first item by hand: an off-by-one in the positions would still give
    plausible-looking numbers, so pin them."""
    from llava_edge.drift.evalset import load_eval_set
    from llava_edge.model.templates import encode_conversation
    from llava_edge.runtimes import GenerationConfig, Prompt, open_runtime

    ref, cand = open_runtime(tiny_model_dir), open_runtime(broken_dir)
    item = load_eval_set(world, limit=1)[0]
    prompt = encode_conversation(ref.tokenizer, ref.template, item.turns, ref.n_image_tokens,
                                 add_generation_prompt=True).input_ids
    reply = list(ref.generate(Prompt(prompt, [ref.encode_image(item.image)]),
                              GenerationConfig(max_new_tokens=N_TOKENS)))
    if len(reply) < N_TOKENS:
        reply.append(ref.tokenizer.eos_id)  # it stopped at end-of-sequence: that prediction counts too
    ids = np.array(prompt + reply[:-1])
    rows = slice(len(prompt) - 1, None)
    p = ref.logits(Prompt(ids, [ref.encode_image(item.image)]))[rows].astype(np.float64)
    q = cand.logits(Prompt(ids, [cand.encode_image(item.image)]))[rows].astype(np.float64)
    log_p = p - np.log(np.exp(p).sum(-1, keepdims=True))  # logits of ~0.2: no overflow to guard
    log_q = q - np.log(np.exp(q).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    first = report["broken"].items[0]
    assert first["positions"] == len(reply) == len(kl)
    assert first["kl_mean"] == pytest.approx(kl.mean(), rel=1e-9)
    assert first["top1"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())


def test_assert_within(report):
    report.assert_within(candidates=["fp16", "bf16"])  # the defaults
    report.assert_within(max_kl=1e-5, min_top1=0.95, max_accuracy_drop=0.0, candidates=["fp16"])
    with pytest.raises(DriftExceeded) as exc:
        report.assert_within(max_kl=1e-3, min_top1=0.9, max_accuracy_drop=0.0)
    lines = str(exc.value).splitlines()
    assert lines[0] == "2 drift limit(s) exceeded:"  # broken: KL ~2e-3 and top-1 ~45%
    assert all(re.search(r"\[(max_kl|min_top1)\] \(noise floor (0|100\.0%)\)$", line) for line in lines[1:])
    assert {line.split(":")[0].strip() for line in lines[1:]} == {"broken"}


def test_a_vision_token_order_defect_is_caught_and_put_on_the_vision_side(tiny_model_dir, world):
    """Image tokens shifted by one position (patch 0 dropped, one token out of place), the shape of
    llama.cpp's CLS-order defect (shared/DESIGN.md). An untrained decoder barely uses the image, so
    its logits hardly move: the image-embedding gate is what catches it."""
    from llava_edge.runtimes.torch_runtime import TorchRuntime

    class ShiftedTokens(TorchRuntime):
        def _encode_pixels(self, pixel_values):
            embeds = super()._encode_pixels(pixel_values)
            return np.concatenate([embeds[:, 1:], embeds[:, :1]], axis=1)

    shifted = ShiftedTokens.open(tiny_model_dir)
    shifted.label = "shifted"
    report = compare(f"torch:{tiny_model_dir}", [shifted], world, limit=4, max_new_tokens=6, floor=None)
    m = report["shifted"].metrics
    assert [v.limit for v in report.check()] == ["min_image_cosine"]  # measured cosine ~0.85
    assert m["decoder_only.kl_mean"] == 0  # same decoder: all of the drift is on the vision side
    assert m["vision_only.kl_mean"] == m["e2e.kl_mean"]


def test_sharpened_model_kl_gates_catch_the_broken_decoder(tiny_model_dir, world, tmp_path):
    sharp = _edited_copy(tiny_model_dir, tmp_path / "sharp", sharpen)
    sharp_broken = _edited_copy(sharp, tmp_path / "sharp-broken", zero_decoder_layer)
    report = compare(f"torch:{sharp}", [f"fp16=torch:{sharp}?dtype=float16", f"broken=torch:{sharp_broken}"],
                     world, limit=6, max_new_tokens=N_TOKENS, floor=None)
    assert {v.limit for v in report.check()} >= {"max_kl", "min_top1"}  # measured: KL ~0.7, top-1 ~57%
    assert {v.candidate for v in report.check()} == {"broken"}
    assert report["fp16"].metrics["e2e.kl_mean"] < 1e-4  # measured ~3e-6
    assert report.floor is None


# --- the command function: exit codes and the written report -------------------------------------------
def test_drift_exit_codes_and_report_files(tiny_model_dir, broken_dir, world, tmp_path):
    from rich.console import Console

    tiny, small = tiny_model_dir, {"limit": 4, "max_new_tokens": 6}
    console = Console(file=io.StringIO(), width=200)
    assert drift(f"torch:{tiny}", [f"fp16=torch:{tiny}?dtype=float16"], world, console=console, **small) == 0

    out = tmp_path / "report"
    assert drift(f"torch:{tiny}", [f"broken=torch:{broken_dir}"], world, out=out, console=console, **small) == 1
    text = console.file.getvalue()
    assert "FAIL broken: e2e.top1 = " in text and "[min_top1] (noise floor 100.0%)" in text

    loaded = DriftReport.load(out / "report.json")
    assert loaded.labels == ["broken"] and loaded.n_items == 4 and len(loaded["broken"].items) == 4
    md = (out / "report.md").read_text()
    assert f"--candidate broken=torch:{broken_dir}" in md and "| broken | torch |" in md and "**FAIL**" in md
    for name in ("kl_by_position", "components", "accuracy_vs_size"):
        with Image.open(out / "plots" / f"{name}.png") as png:
            assert png.format == "PNG" and min(png.size) > 200
        assert f"](plots/{name}.png)" in md

    tight = tmp_path / "tight.toml"
    tight.write_text("max_kl = 1e-15\n")  # below fp16's drift: must fail
    assert drift(f"torch:{tiny}", [f"fp16=torch:{tiny}?dtype=float16"], world, thresholds=tight,
                 console=console, **small) == 1
    lenient = tmp_path / "lenient.json"
    lenient.write_text('{"candidate": {"broken": {"min_top1": false}}}')
    assert drift(f"torch:{tiny}", [f"broken=torch:{broken_dir}"], world, thresholds=lenient,
                 console=console, **small) == 0


def test_bad_inputs_fail_before_any_model_is_loaded(tiny_model_dir, world, tmp_path):
    from llava_edge.errors import UserError

    with pytest.raises(UserError, match="no such model folder or bundle"):
        compare(f"torch:{tiny_model_dir}", ["torch:/no/such/model"], world)
    with pytest.raises(UserError, match="no candidates"):
        compare(f"torch:{tiny_model_dir}", [], world)
    bad = tmp_path / "bad.toml"
    bad.write_text("max_kld = 1\n")
    with pytest.raises(UserError, match="unknown limit"):
        drift(f"torch:{tiny_model_dir}", [f"torch:{tiny_model_dir}"], world, thresholds=bad)


# --- any runtime, through the protocol only -------------------------------------------------------------
def scripted(model_dir, world, *, wrong_mc: bool = False, vision_noise: float = 0.0):
    """A numpy runtime with no neural network: it answers each eval prompt with the gold answer
    (or, ``wrong_mc``, a wrong letter to every multiple-choice question), and exposes the optional
    vision-tower method. Only the protocol's primitives are implemented. Two records can ask the
    same question of different images, so the script is keyed by (image identity, prompt ids)."""
    from llava_edge.drift.evalset import load_eval_set
    from llava_edge.model.image import image_digest, load_image
    from llava_edge.model.loading import load_tokenizer, read_model_info
    from llava_edge.model.templates import encode_conversation
    from llava_edge.runtimes.base import Runtime

    info = read_model_info(model_dir)
    tokenizer = load_tokenizer(model_dir)
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(3, 16)).astype(np.float32)

    class Scripted(Runtime):
        name = "scripted"

        def __init__(self):
            super().__init__(tokenizer=tokenizer, template=info.template, preprocess=info.preprocess,
                             n_image_tokens=info.n_image_tokens, image_token_id=info.image_token_id)
            self.script = {}
            for item in load_eval_set(world):
                prompt = encode_conversation(tokenizer, info.template, item.turns, info.n_image_tokens,
                                             add_generation_prompt=True).input_ids
                answer = item.answer
                if wrong_mc and item.kind == "mc":
                    answer = "A" if answer != "A" else "B"
                key = (image_digest(load_image(item.image)), tuple(prompt))
                self.script[key] = tokenizer.encode(" " + answer) + [tokenizer.eos_id]
            self.context: list[int] = []
            self.image = None

        def _patches(self, pixels: np.ndarray) -> np.ndarray:
            n, c, s, _ = pixels.shape
            side = int(round(self.n_image_tokens ** 0.5))
            patches = pixels.reshape(n, c, side, s // side, side, s // side).mean(axis=(3, 5))
            return patches.reshape(n, c, -1).transpose(0, 2, 1) + vision_noise  # [n, tokens, 3]

        def encode_image_features(self, image):
            from llava_edge.model.image import load_image, preprocess

            return self._patches(preprocess(load_image(image), self.preprocess_config)[None])[0]

        def _encode_pixels(self, pixels):
            return self._patches(pixels) @ projection

        def _next(self, context) -> np.ndarray:
            logits = np.zeros(tokenizer.vocab_size, np.float32)
            for (image, prompt), target in self.script.items():
                if image == self.image and tuple(context[:len(prompt)]) == prompt:
                    done = list(context[len(prompt):])
                    ok = done == target[:len(done)] and len(done) < len(target)
                    logits[target[len(done)] if ok else tokenizer.eos_id] = 8.0
                    return logits
            return logits  # inside a prompt: nothing to predict

        def logits(self, prompt):
            self.image = prompt.image_keys[0]
            ids = prompt.input_ids.tolist()
            return np.stack([self._next(ids[:i + 1]) for i in range(len(ids))])

        def _prefill(self, prompt, reuse):
            self.image = prompt.image_keys[0]
            self.context = prompt.input_ids.tolist()
            return self._next(self.context)

        def _step(self, token_id):
            self.context.append(token_id)
            return self._next(self.context)

    return Scripted()


def test_any_runtime_accuracy_gate_and_vision_tower_metrics(tiny_model_dir, world):
    oracle = scripted(tiny_model_dir, world)
    noisy = scripted(tiny_model_dir, world, vision_noise=0.05)
    wrong = scripted(tiny_model_dir, world, wrong_mc=True)
    noisy.label, wrong.label = "noisy-vision", "wrong-mc"  # runtime objects may carry a label
    report = compare(oracle, [noisy, wrong], world, floor=None)
    assert report.reference.metrics["task.accuracy"] == 1.0  # the scoring reads the gold answers
    m = report["wrong-mc"].metrics
    assert (m["task.accuracy_short"], m["task.accuracy_mc"], m["task.accuracy_drop"]) == (1.0, 0.0, 0.5)
    assert m["generation.exact_match"] == 0.5
    # all 6 letters lost, none gained: chance does that 1 time in 64, so the drop counts
    assert (m["task.answers_lost"], m["task.answers_gained"], m["task.drop_p"]) == (6, 0, 1 / 64)
    violations = report.check()
    assert {v.candidate for v in violations} == {"wrong-mc"}
    # its wrong letters also show in the logits (KL, top-1) of the reference's reply
    assert {v.limit for v in violations} == {"max_accuracy_drop", "max_kl", "max_kl_p99", "min_top1"}
    # the optional vision-tower method is used when both runtimes have it
    n = report["noisy-vision"].metrics
    assert n["vision.max_abs"] == pytest.approx(0.05, rel=1e-4) and n["vision.cosine_mean"] < 1
    assert n["image.cosine_mean"] < 1 and n["task.accuracy_drop"] == 0


# --- the pytest plugin ------------------------------------------------------------------------------------
def test_drift_compare_fixture_measures_each_comparison_once(tiny_model_dir, world, tmp_path):
    session = DriftSession(out=str(tmp_path / "reports"))
    args = (f"torch:{tiny_model_dir}", [f"fp16=torch:{tiny_model_dir}?dtype=float16"], world)
    first = session(*args, limit=2, max_new_tokens=4)
    assert session(*args, limit=2, max_new_tokens=4) is first
    quick = session(*args, limit=1, max_new_tokens=4, attribution=False)
    assert quick is not first and quick.n_items == 1
    assert "decoder_only.kl_mean" in first["fp16"].metrics
    assert "decoder_only.kl_mean" not in quick["fp16"].metrics  # end-to-end figures only
    assert (tmp_path / "reports" / "drift-1" / "report.json").is_file()
    assert DriftReport.load(tmp_path / "reports" / "drift-2" / "report.json").settings["attribution"] is False


def _docs_examples() -> dict[str, str]:
    """The code blocks of docs/drift.md marked ``<!-- drift-example: FILE -->``: the test runs the
    documented example itself, so the docs cannot go stale."""
    text = (REPO / "docs" / "drift.md").read_text()
    return dict(re.findall(r"<!-- drift-example: (\S+) -->\n```python\n(.*?)```", text, re.S))


def test_documented_fixture_example_runs_in_a_user_suite(tiny_model_dir, world, tmp_path):
    examples = _docs_examples()
    assert set(examples) == {"conftest.py", "test_release_gate.py"}
    for name, code in examples.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    run = subprocess.run(
        # KEY=VALUE form: pytest reads conftest options only after a first pass over the arguments,
        # in which a separate value would be taken for a test path.
        base + [f"--drift-reference=torch:{tiny_model_dir}",
                f"--drift-candidate=fp16=torch:{tiny_model_dir}?dtype=float16",
                f"--drift-eval={world}", "--drift-limit=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert re.search(r"fp16: KL [0-9.e-]+, top-1 100\.0%.* -- within default thresholds", run.stdout)
    # unconfigured: skipped with the reason, not failed
    run = subprocess.run(base + ["-rs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0 and "1 skipped" in run.stdout and "drift_report is not configured" in run.stdout


def test_cli_exit_status_gates_a_release(tiny_model_dir, broken_dir, world, tmp_path):
    """`llava-edge drift` itself exits 1 when a limit is exceeded (a shell or CI step sees it)."""
    import subprocess
    import sys

    def run(candidate):
        return subprocess.run([sys.executable, "-m", "llava_edge.cli", "drift", "--reference", f"torch:{tiny_model_dir}",
                               "--candidate", candidate, "--eval", str(world), "--limit", "2",
                               "--max-new-tokens", "4", "--no-attribution"], capture_output=True, text=True)

    assert run(f"broken=torch:{broken_dir}").returncode == 1
    ok = run(f"fp16=torch:{tiny_model_dir}?dtype=float16")
    assert ok.returncode == 0, ok.stdout + ok.stderr
