"""The command line: init + chat end to end, one-line user errors, --help in step with the code."""

import os
import subprocess
import sys

import pytest

from llava_edge.cli import app


def run_cli(*args, input=None, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-m", "llava_edge.cli", *map(str, args)], input=input,
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "shapes.png"
    Image.new("RGB", (40, 24), (10, 200, 30)).save(path)
    return path


def test_init_then_chat_streams_the_torch_runtime_reply(tmp_path, image_file):
    model = tmp_path / "m"
    result = run_cli("init", "--preset", "tiny", model)
    assert result.returncode == 0, result.stderr
    result = run_cli("chat", model, "--image", image_file, "--prompt", "What is it?",
                     "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    from llava_edge.runtimes import Conversation, GenerationConfig, open_runtime

    expected = Conversation(open_runtime(model)).ask("What is it?", image=image_file,
                                                     config=GenerationConfig(max_new_tokens=12))
    assert result.stdout.rstrip("\n") == expected


def test_interactive_chat_keeps_the_conversation(tiny_model_dir, image_file):
    result = run_cli("chat", tiny_model_dir, "--image", image_file, "--max-new-tokens", "4",
                     input="hello\nand again\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("llava> ") == 2


@pytest.mark.parametrize("args, message", [
    (["chat", "/nonexistent/model", "--prompt", "hi"], "no such model folder"),
    (["init", "--preset", "giant", "OUT"], "unknown preset 'giant'"),
    (["chat", "{model}", "--image", "/nonexistent.png", "--prompt", "hi"], "/nonexistent.png"),
    (["chat", "{model}", "--runtime", "tpu", "--prompt", "hi"], "unknown runtime 'tpu'"),
    (["chat", "{model}", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_user_errors_are_one_line_and_exit_2(tiny_model_dir, tmp_path, args, message):
    args = [a.replace("{model}", str(tiny_model_dir)) for a in args]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "chat", tmp_path / "missing", "--prompt", "hi")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_inspect_prints_components(tiny_model_dir):
    result = run_cli("inspect", tiny_model_dir)
    assert result.returncode == 0, result.stderr
    for part in ("vision tower", "projector", "decoder", "total"):
        assert part in result.stdout


def test_every_command_has_help():
    """The README's command list and the CLI stay in step."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    from llava_edge.cli import data_app

    commands = [(c.name or c.callback.__name__, c) for c in app.registered_commands]
    commands += [(f"data {c.name}", c) for c in data_app.registered_commands]
    for name, command in commands:
        assert command.callback.__doc__, f"{name} has no help text"
        assert f"llava-edge {name}" in readme, f"README does not show `llava-edge {name}`"


def test_unknown_runtime_option_lists_the_valid_ones(tiny_model_dir):
    result = run_cli("chat", tiny_model_dir, "--prompt", "hi", "-o", "vision=mmproj")
    assert result.returncode == 2
    assert "runtime 'torch' has no option 'vision'; it takes: dtype, device" in result.stderr


def test_export_refuses_two_precisions(tiny_model_dir, tmp_path):
    result = run_cli("export", tiny_model_dir, "--out", tmp_path / "b", "--int4", "--fp16")
    assert result.returncode == 2 and "choose one precision flag" in result.stderr
