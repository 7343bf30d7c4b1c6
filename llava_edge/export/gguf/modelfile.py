"""The Ollama ``Modelfile`` written next to the GGUF files.

Ollama imports a LLaVA model from two ``FROM`` lines, language model first, projector second (it
recognises the ``clip`` GGUF as the projector layer; ``ADAPTER`` is for LoRA adapters and does not
load an mmproj). Its templates are Go templates, so each of our chat templates has its Ollama
counterpart here, laid out exactly like ``llava_edge.model.templates`` lays out the prompt.
"""

from __future__ import annotations

from llava_edge.errors import ModelError
from llava_edge.model.templates import get_template

# Ollama puts the image(s) of a message in front of its content, as our "<image>\n" does.
OLLAMA_TEMPLATES = {
    "vicuna_v1": (
        '{{- if .System }}{{ .System }} {{ end }}'
        '{{- range .Messages }}'
        '{{- if eq .Role "user" }}USER: {{ .Content }} '
        '{{- else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}</s>'
        '{{- end }}{{- end }}ASSISTANT:'
    ),
    # Stage-1 models: the image alone is the prompt, the reply is a caption ended by a newline.
    "plain": (
        '{{- range .Messages }}'
        '{{- if eq .Role "user" }}{{ .Content }}'
        '{{- else if eq .Role "assistant" }}{{ .Content }}\n'
        '{{- end }}{{- end }}'
    ),
}


def _quote(text: str) -> str:
    if '"""' in text:
        raise ModelError(f"cannot write {text[:40]!r}... into a Modelfile (it contains \"\"\")")
    return f'"""{text}"""'


def _stop_literal(stop: str) -> str:
    return _quote(stop) if "\n" in stop or '"' in stop else f'"{stop}"'


def render_modelfile(model_file: str, mmproj_file: str, template_name: str, *, num_ctx: int) -> str:
    template = get_template(template_name)
    if template_name not in OLLAMA_TEMPLATES:
        raise ModelError(f"no Ollama template for chat template {template_name!r}")
    lines = [
        "# Ollama: `ollama create NAME -f Modelfile` in this folder (language model, then projector).",
        f"FROM ./{model_file}",
        f"FROM ./{mmproj_file}",
        f"TEMPLATE {_quote(OLLAMA_TEMPLATES[template_name])}",
    ]
    if template.system.strip():
        lines.append(f"SYSTEM {_quote(template.system.strip())}")
    stops = list(template.stop)
    if template.user_prefix.strip():
        stops.append(template.user_prefix.strip())  # the model starting the next user turn
    lines += [f"PARAMETER stop {_stop_literal(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"
