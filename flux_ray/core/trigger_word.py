"""The trigger word (``datasets[].trigger_word``) in captions and validation prompts."""
from __future__ import annotations

import re

from flux_ray.spec import TRIGGER_PLACEHOLDER


def apply_trigger_word(text: str, word: str | None) -> str:
    """``[trigger]`` replaced by ``word``; without the placeholder, ``"<word>, text"`` unless the text already
    holds the word (ai-toolkit's and the hosted Flux trainers' rule). No word: the text as it is."""
    if not word:
        return text
    if TRIGGER_PLACEHOLDER in text:
        return text.replace(TRIGGER_PLACEHOLDER, word)
    if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text):
        return text
    return f"{word}, {text}" if text else word
