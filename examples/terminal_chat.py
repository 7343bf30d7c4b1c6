"""Chat with a bundle in the terminal: ``python examples/terminal_chat.py BUNDLE [IMAGE]``.

``/image PATH`` attaches an image to your next message; an empty line quits.
"""

import sys

from llava_edge.api import load  # also `llava_edge.load`
from llava_edge.errors import UserError

assistant = load(sys.argv[1])  # runtime="auto": llama.cpp, else onnxruntime
chat = assistant.chat(max_new_tokens=256)
image = sys.argv[2] if len(sys.argv) > 2 else None
print(f"{assistant.runtime_name} runtime. /image PATH attaches an image; an empty line quits.")
while text := input("you> ").strip():
    if text.startswith("/image "):
        image = text.removeprefix("/image ").strip()
        continue
    try:
        for piece in chat.send(text, image=image):
            print(piece, end="", flush=True)
    except UserError as exc:  # a bad image, or a conversation longer than the context
        print(f"\nerror: {exc} (starting a new conversation)")
        chat = assistant.chat(max_new_tokens=256)
    print()
    image = None
