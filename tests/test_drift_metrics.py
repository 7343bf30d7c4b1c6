"""Drift building blocks without a model: metric formulas on hand-computed inputs, runtime specs,
eval-set scoring, thresholds files and the report's checks and JSON round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llava_edge.drift import metrics as M
from llava_edge.drift.evalset import EvalItem, choice_letter, load_eval_set, normalise_answer, score_reply
from llava_edge.drift.report import CandidateResult, DriftExceeded, DriftReport, ReferenceResult
from llava_edge.drift.spec import parse_spec
from llava_edge.drift.thresholds import DEFAULT_THRESHOLDS, LIMITS, load_thresholds
from llava_edge.errors import DataError, UserError


# --- metrics ---------------------------------------------------------------------------------------
def test_kl_of_identical_distributions_is_exactly_zero():
    logits = np.random.default_rng(0).normal(size=(7, 50)).astype(np.float32)
    assert np.array_equal(M.kl_divergence(logits, logits), np.zeros(7))


def test_kl_hand_computed():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln(2) + 1/2 ln(2/3)
    p, q = np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert M.kl_divergence(p, q)[0] == pytest.approx(expected, rel=1e-12)
    # the other direction differs: KL is not symmetric
    assert M.kl_divergence(q, p)[0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)


def test_kl_ignores_a_constant_logit_shift_and_handles_masked_tokens():
    logits = np.array([[2.0, 1.0, -1.0]])
    assert M.kl_divergence(logits, logits + 123.0)[0] == pytest.approx(0.0, abs=1e-12)
    masked = np.array([[0.0, 0.0, -np.inf]])  # the reference gives token 2 no mass
    assert M.kl_divergence(masked, np.array([[0.0, 0.0, 0.0]]))[0] == pytest.approx(math.log(3 / 2))
    # the candidate gives no mass to a token the reference finds likely: infinite divergence
    assert M.kl_divergence(np.zeros((1, 3)), masked)[0] == np.inf


def test_nan_logits_give_nan_kl():
    assert np.isnan(M.kl_divergence(np.zeros((1, 3)), np.array([[0.0, np.nan, 0.0]]))[0])


def test_top1_nll_and_perplexity():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    cand = np.array([[3.0, 0.0, 1.0], [2.0, 0.0, 1.0]])
    assert M.top1_agreement(ref, cand).tolist() == [1.0, 0.0]
    uniform = np.zeros((4, 10))
    nll = M.token_nll(uniform, [1, 2, 3, 4])
    assert nll == pytest.approx([math.log(10)] * 4)
    assert M.perplexity(nll) == pytest.approx(10.0)  # a uniform model over 10 tokens


def test_embedding_errors():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert M.cosine_rows(ref, 3 * ref).tolist() == pytest.approx([1.0, 1.0])  # scale-free
    assert M.cosine_rows(ref, ref[:, ::-1]).tolist() == pytest.approx([0.0, 0.0])  # orthogonal rows
    cand = ref + np.array([[0.0, 0.5], [0.0, 0.0]])
    assert M.max_abs_error(ref, cand) == 0.5
    assert M.relative_l2_error(ref, cand) == pytest.approx(0.5 / math.sqrt(5))
    with pytest.raises(ValueError, match="different shapes"):
        M.cosine_rows(ref, ref[:1])


def test_common_prefix_and_percentile():
    assert M.common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert M.common_prefix_length([1, 2], [1, 2]) == 2
    assert M.common_prefix_length([], [1]) == 0
    assert M.percentile(np.arange(101), 99) == pytest.approx(99.0)


def test_sign_test_p_hand_computed():
    """P(X >= lost), X ~ Binomial(lost + gained, 1/2)."""
    assert M.sign_test_p(3, 0) == 1 / 8
    assert M.sign_test_p(6, 0) == 1 / 64
    assert M.sign_test_p(2, 1) == 4 / 8  # (3 choose 2 + 3 choose 3) / 2^3
    assert M.sign_test_p(0, 4) == 1.0 and M.sign_test_p(0, 0) == 1.0
    assert M.sign_test_p(12, 1) == pytest.approx(14 / 2 ** 13)


# --- specs -------------------------------------------------------------------------------------------
def test_parse_spec_forms():
    spec = parse_spec("fp16=torch:runs/m?dtype=float16&threads=2&verify=false&scale=0.5")
    assert (spec.label, spec.runtime, str(spec.path)) == ("fp16", "torch", "runs/m")
    assert spec.options == {"dtype": "float16", "threads": 2, "verify": False, "scale": 0.5}
    assert parse_spec(str(spec)) == spec  # str() gives back a spec that parses to the same
    plain = parse_spec("onnx:bundles/int4")
    assert (plain.runtime, plain.options, plain.label) == ("onnx", {}, "onnx-int4")
    assert parse_spec("llamacpp:b?vision=mmproj").label == "llamacpp-b-mmproj"
    assert parse_spec("torch:a=b").path.name == "a=b"  # '=' in a path is not a label


def test_parse_spec_errors_say_what_to_do():
    with pytest.raises(UserError, match="unknown runtime 'tensorflow'.*available: .*torch"):
        parse_spec("tensorflow:model")
    with pytest.raises(UserError, match="not KEY=VALUE"):
        parse_spec("torch:model?float16")
    with pytest.raises(UserError, match="no such model folder or bundle"):
        parse_spec("/no/such/folder")


def test_bare_path_infers_the_runtime(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert parse_spec(str(model)).runtime == "torch"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = {"format_version": 1, "model_name": "m", "source": "", "source_sha256": "", "preprocess": {},
                "n_image_tokens": 1, "image_token_id": 4, "d_model": 8, "vocab_size": 8, "template": "plain",
                "chat_template_jinja": "", "stop": [], "bos_id": 1, "eos_id": 2,
                "components": {"onnx/decoder": {"file": "onnx/d.onnx", "format": "onnx", "precision": "fp32",
                                                "sha256": "", "bytes": 1}}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert parse_spec(f"q={bundle}").runtime == "onnx"
    manifest["components"]["gguf/model"] = {**manifest["components"]["onnx/decoder"], "format": "gguf"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="name the runtime, e.g. onnx:.* or llamacpp:"):
        parse_spec(str(bundle))


# --- eval set and scoring ---------------------------------------------------------------------------
def test_multiple_choice_letter_extraction():
    options = ["one", "two", "three"]
    for reply, letter in [("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) two", "B"), ("B. two", "B"),
                          ("two", "B"), ("Two.", "B"), ("A red circle", None), ("D", None), ("b", None)]:
        assert choice_letter(reply, options) == letter, reply


def test_scoring_short_and_mc():
    short = EvalItem("s", None, [], answer="bottom left", kind="short")
    assert score_reply(short, "  Bottom   left. ")
    assert not score_reply(short, "bottom")
    mc = EvalItem("m", None, [], answer="C", kind="mc", options=["x", "y", "z"])
    assert score_reply(mc, "C") and score_reply(mc, "z") and not score_reply(mc, "A")
    assert score_reply(EvalItem("n", None, []), "anything") is None  # no gold answer: not scored
    assert normalise_answer('"Yes!"') == "yes"


def test_load_synth_eval_set(tmp_path):
    from llava_edge.data.synth import synth

    synth(tmp_path / "world", n=0, n_eval=2, image_size=32)
    items = load_eval_set(tmp_path / "world")  # the folder: its eval.json, images under images/
    assert [i.kind for i in items] == ["short", "mc", "short", "mc"]
    assert all(i.image.is_file() and i.turns[-1][0] == "human" for i in items)
    assert items[1].options and items[1].answer in "ABCD"
    assert len(load_eval_set(tmp_path / "world" / "eval.json", limit=3)) == 3
    with pytest.raises(DataError, match="no such eval file"):
        load_eval_set(tmp_path / "nothing.json")


# --- thresholds ---------------------------------------------------------------------------------------
def test_defaults_have_reasons_and_the_documented_values():
    assert {l.name: l.default for l in LIMITS if l.default is not None} == {
        "max_kl": 0.1, "max_kl_p99": 1.0, "min_top1": 0.85, "max_accuracy_drop": 0.05,
        "min_image_cosine": 0.98}
    assert all(len(l.reason) > 20 for l in LIMITS)


def test_thresholds_file_toml_and_json(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('max_kl = 0.05\nmin_top1 = false\n\n[candidate.q4]\nmax_kl = 0.2\n')
    t = load_thresholds(toml)
    assert t.for_candidate("x")["max_kl"] == 0.05 and t.for_candidate("q4")["max_kl"] == 0.2
    assert "min_top1" not in t.active("x") and t.active("x")["max_accuracy_drop"] == 0.05
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"max_kl": 0.01}))
    assert load_thresholds(js).limits["max_kl"] == 0.01
    js.write_text(json.dumps({"max_kld": 0.01}))
    with pytest.raises(UserError, match="unknown limit.*'max_kld'.*known: max_kl"):
        load_thresholds(js)
    toml.write_text('max_kl = "small"\n')
    with pytest.raises(UserError, match="expected a number"):
        load_thresholds(toml)


# --- the report, without a model ------------------------------------------------------------------------
def _report(**cand_metrics) -> DriftReport:
    base = {"image.cosine_mean": 0.9999, "e2e.kl_mean": 0.01, "e2e.kl_p99": 0.2, "e2e.top1": 0.95,
            "task.accuracy": 0.8, "task.accuracy_drop": 0.01}
    ref = ReferenceResult("ref", "torch:m", "torch", 100, 1.0, {"e2e.ppl": 2.0, "task.accuracy": 0.81})
    floor = CandidateResult("fp16", "torch:m?dtype=float16", "torch",
                            {**base, "e2e.kl_mean": 1e-6, "e2e.top1": 1.0}, role="floor")
    cands = [CandidateResult(name, "x", "onnx", {**base, **m}, kl_by_position={"e2e": [0.1, 0.2]})
             for name, m in cand_metrics.items()]
    return DriftReport(ref, cands, floor, "eval.json", 10, {"max_new_tokens": 8})


def test_check_and_assert_within():
    report = _report(good={}, bad={"e2e.kl_mean": 0.5, "e2e.top1": 0.6}, nan={"e2e.kl_mean": float("nan")},
                     no_gold={"task.accuracy": None, "task.accuracy_drop": None})
    broken = {(v.candidate, v.limit) for v in report.check()}
    assert broken == {("bad", "max_kl"), ("bad", "min_top1"), ("nan", "max_kl")}
    assert report.unchecked() == {"no_gold": ["max_accuracy_drop"]}
    report.assert_within(candidates=["good", "no_gold"])  # the defaults
    report.assert_within(max_kl=0.02, candidates=["good"])
    with pytest.raises(DriftExceeded) as exc:
        report.assert_within(max_kl=0.005)  # only this limit is checked: 'bad' fails it, and 'nan'
    message = str(exc.value)
    assert "good: e2e.kl_mean = 1.00e-02, must be <= 0.005 [max_kl] (noise floor 1.00e-06)" in message
    assert "min_top1" not in message
    with pytest.raises(AssertionError):  # DriftExceeded is what pytest reports as a failed assertion
        report.assert_within(candidates=["bad"])
    with pytest.raises(UserError, match="unknown limit"):
        report.assert_within(max_kld=0.1)


def test_an_accuracy_drop_that_chance_explains_is_reported_not_counted():
    """What the demo base's int4 TensorRT-ONNX export measured on 24 answers: 3 multiple-choice
    letters lost, none gained (12.5 points, p = 0.125). 5 lost and none gained (p = 1/32) fails, and
    so does a report written before the chance metric existed (no task.drop_p)."""
    drop = {"task.accuracy_drop": 0.125, "task.answers_lost": 3, "task.answers_gained": 0}
    report = _report(chance={**drop, "task.drop_p": M.sign_test_p(3, 0)},
                     real={**drop, "task.drop_p": M.sign_test_p(5, 0)}, old=drop)
    assert {(v.candidate, v.limit) for v in report.check()} == {("real", "max_accuracy_drop"),
                                                                ("old", "max_accuracy_drop")}
    assert report.within_chance() == [
        "chance: task.accuracy_drop = 12.5% is past <= 5% [max_accuracy_drop], but chance gives as much "
        "(task.drop_p = 0.125 >= 0.05); not counted"]
    summary = report.manifest_summary("chance")
    assert summary["passed"] is True and summary["metrics"]["task.answers_lost"] == 3
    assert summary["within_chance"] == report.within_chance()
    from llava_edge.export.verify import drift_summary  # what export and inspect print

    lines = drift_summary({"int4": summary})
    assert lines[0].startswith("int4: passed") and "task.drop_p=0.125" in lines[0]
    assert lines[1] == "  within chance, not counted: " + report.within_chance()[0]
    assert "not counted" in report.to_markdown()
    report.assert_within(max_accuracy_drop=0.05, candidates=["chance"])
    with pytest.raises(DriftExceeded, match="real: task.accuracy_drop = 12.5%"):
        report.assert_within(max_accuracy_drop=0.05, candidates=["real"])


def test_json_round_trip_keeps_nan_failing(tmp_path):
    report = _report(nan={"e2e.kl_mean": float("nan")})
    path = report.save_json(tmp_path / "r.json")
    json.loads(path.read_text())  # standard JSON: no bare NaN
    again = DriftReport.load(path)
    assert again.result("nan").kl_by_position == {"e2e": [0.1, 0.2]}
    assert [v.limit for v in again.check()] == ["max_kl"]
    summary = again.manifest_summary("nan")
    assert summary["passed"] is False and summary["thresholds"] == DEFAULT_THRESHOLDS.active()


def test_markdown_puts_the_floor_next_to_every_figure():
    md = _report(good={}, bad={"e2e.top1": 0.6}).to_markdown(command="llava-edge drift ...")
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header.split("|")[3:6] == [" reference<br>ref ", " noise floor<br>fp16 ", " good "]
    assert "| e2e: top-1 agree | >= 85% | - | 100.0% | 95.0% | **60.0%** |" in md
    assert "| bad | onnx | - | **FAIL** | e2e.top1 = 60.0%, must be >= 85% [min_top1] (noise floor 100.0%) |" in md


def test_record_in_bundle_keeps_other_entries(tmp_path):
    from llava_edge.drift import record_in_bundle
    from llava_edge.export.bundle import read_manifest

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = {"format_version": 1, "model_name": "m", "source": "", "source_sha256": "", "preprocess": {},
                "n_image_tokens": 1, "image_token_id": 4, "d_model": 8, "vocab_size": 8, "template": "plain",
                "chat_template_jinja": "", "stop": [], "bos_id": 1, "eos_id": 2, "components": {},
                "drift": {"int8": {"passed": True}}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    record_in_bundle(bundle, _report(int4={"e2e.top1": 0.5}), "int4")
    drift = read_manifest(bundle).drift
    assert drift["int8"] == {"passed": True}
    assert drift["int4"]["passed"] is False and drift["int4"]["metrics"]["e2e.top1"] == 0.5
    assert drift["int4"]["floor"]["e2e.kl_mean"] == 1e-6


def test_file_size_counts_the_components_the_runtime_reads(tmp_path):
    from llava_edge.drift.spec import model_bytes

    bundle = tmp_path / "bundle"
    (bundle / "onnx").mkdir(parents=True)
    sizes = {"onnx/vision": 1000, "onnx/projector": 100, "onnx/decoder": 5000, "gguf/model": 800,
             "gguf/model-Q4_0": 200, "gguf/mmproj": 300}
    components = {}
    for key, size in sizes.items():
        rel = key.replace("/", "_")
        (bundle / rel).write_bytes(b"x" * size)
        precision = key.split("-")[1] if "-" in key else ("F16" if key.startswith("gguf") else "fp32")
        components[key] = {"file": rel, "format": key.split("/")[0], "precision": precision, "sha256": "",
                           "bytes": size}
    (bundle / "onnx" / "vision.data").write_bytes(b"x" * 10)  # ONNX external data counts too
    components["onnx/vision"]["extra_files"] = ["onnx/vision.data"]
    manifest = {"format_version": 1, "model_name": "m", "source": "", "source_sha256": "", "preprocess": {},
                "n_image_tokens": 1, "image_token_id": 4, "d_model": 8, "vocab_size": 8, "template": "plain",
                "chat_template_jinja": "", "stop": [], "bos_id": 1, "eos_id": 2, "components": components}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert model_bytes(parse_spec(f"onnx:{bundle}")) == 1010 + 100 + 5000
    assert model_bytes(parse_spec(f"llamacpp:{bundle}?vision=mmproj")) == 800 + 300
    assert model_bytes(parse_spec(f"llamacpp:{bundle}?quant=Q4_0&vision=onnx")) == 200 + 1010 + 100

    class Opened:  # a runtime that reports its own files wins over the manifest
        def model_files(self):
            return [bundle / "gguf_model-Q4_0"]

    assert model_bytes(parse_spec(f"llamacpp:{bundle}"), Opened()) == 200
