"""How a transformers decoder is handed its KV cache: one place decides the keyword.

transformers 5.x renamed the argument: older releases take ``past_key_values=``; newer ones (5.25
here) take ``cache=``, warn on the old name and drop it in 5.40. We support every 5.x, so the name
is read from the decoder's own ``forward`` signature instead of a version table.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, as ``module.forward`` takes it."""
    return {_keyword(type(module).forward): cache}
