"""Prompt templates: the one place where the wording of every VLM prompt lives.

Each template is a ``str.format`` string. Override any of them from YAML::

    prompt_templates:
      item_text: "Product: {text}\\nDescribe this product in one word:"

Placeholders: ``{text}`` an item's text (composed by the caller from title, brand, categories ...),
``{image}`` one image (expanded to the backbone's visual tokens), ``{history}`` the user's history
entries joined by ``history_separator``, ``{index}`` an entry's 1-based number, ``{prompt}`` the body
inside the ``chat`` wrapper. Write literal braces as ``{{`` and ``}}``.

The embedding is the hidden state of the prompt's last token, so every body ends with an instruction
that asks for a one-word summary (the E5-V / VLM2Vec recipe): that token then has to gather the item.
"""
from __future__ import annotations

import string
from typing import Mapping, Optional, Sequence

DEFAULT_TEMPLATES = {
    # Qwen-VL instruct checkpoints are chat models: every prompt is one user turn, and the embedding is
    # read at the start of the assistant's answer.
    "chat": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "item_text": "Item: {text}\nSummarize the above item in one word:",
    "item_image": "Item image: {image}\nSummarize the above item in one word:",
    "user_text": "A user bought these items, in order:\n{history}\nSummarize the user's next item in one word:",
    "user_text_entry": "{index}. {text}",
    "user_image": "A user bought the items in these images, in order:\n{history}\n"
                  "Summarize the user's next item in one word:",
    "user_image_entry": "{index}. {image}",
    "interleaved_item": "Item: {image}\n{text}\nSummarize the above item in one word:",
    "interleaved_user": "A user bought these items, in order:\n{history}\nSummarize the user's next item in one word:",
    "interleaved_user_entry": "{index}. {image}{text}",
    "history_separator": "\n",
}

# template -> (placeholders it must contain, placeholders it may contain)
_FIELDS = {
    "chat": ({"prompt"}, {"prompt"}),
    "item_text": ({"text"}, {"text"}),
    "item_image": ({"image"}, {"image"}),
    "user_text": ({"history"}, {"history"}),
    "user_text_entry": ({"text"}, {"text", "index"}),
    "user_image": ({"history"}, {"history"}),
    "user_image_entry": ({"image"}, {"image", "index"}),
    "interleaved_item": ({"image", "text"}, {"image", "text"}),
    "interleaved_user": ({"history"}, {"history"}),
    "interleaved_user_entry": ({"image", "text"}, {"image", "text", "index"}),
    "history_separator": (set(), set()),
}


def resolve_templates(overrides: Optional[Mapping[str, str]] = None) -> dict:
    """Defaults updated with ``overrides``; unknown names or placeholders raise ``ValueError``."""
    templates = dict(DEFAULT_TEMPLATES)
    for name, template in (overrides or {}).items():
        if name not in DEFAULT_TEMPLATES:
            raise ValueError(
                f"prompt_templates: unknown template {name!r}; known: {', '.join(DEFAULT_TEMPLATES)}"
            )
        if not isinstance(template, str):
            raise ValueError(f"prompt_templates.{name} must be a string, got {type(template).__name__}")
        templates[name] = template
    for name, template in templates.items():
        required, allowed = _FIELDS[name]
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as err:
            raise ValueError(f"prompt_templates.{name}: {err} in {template!r} (write literal braces as {{{{ }}}})")
        if fields - allowed:
            raise ValueError(
                f"prompt_templates.{name}: unknown placeholder(s) {sorted(fields - allowed)} in {template!r}; "
                f"allowed: {sorted(allowed) or 'none'}"
            )
        if required - fields:
            raise ValueError(
                f"prompt_templates.{name}: missing placeholder(s) {sorted(required - fields)} in {template!r}"
            )
    return templates


class PromptBuilder:
    """Renders the prompts; ``image`` is the string that stands for one image (one vision block)."""

    def __init__(self, image: str, overrides: Optional[Mapping[str, str]] = None):
        self.templates = resolve_templates(overrides)
        self.image = image

    def _chat(self, body: str) -> str:
        return self.templates["chat"].format(prompt=body)

    def _history(self, entries: Sequence[str], name: str) -> str:
        return self._chat(self.templates[name].format(history=self.templates["history_separator"].join(entries)))

    def item_text(self, text: str) -> str:
        return self._chat(self.templates["item_text"].format(text=text))

    def item_image(self) -> str:
        return self._chat(self.templates["item_image"].format(image=self.image))

    def user_text(self, texts: Sequence[str]) -> str:
        entry = self.templates["user_text_entry"]
        return self._history([entry.format(index=i + 1, text=t) for i, t in enumerate(texts)], "user_text")

    def user_image(self, n_images: int) -> str:
        entry = self.templates["user_image_entry"]
        return self._history([entry.format(index=i + 1, image=self.image) for i in range(n_images)], "user_image")

    def interleaved_item(self, text: str, has_image: bool) -> str:
        return self._chat(self.templates["interleaved_item"].format(image=self.image if has_image else "", text=text))

    def interleaved_user(self, texts: Sequence[str], has_images: Sequence[bool]) -> str:
        entry = self.templates["interleaved_user_entry"]
        entries = [entry.format(index=i + 1, image=self.image if has else "", text=t)
                   for i, (t, has) in enumerate(zip(texts, has_images))]
        return self._history(entries, "interleaved_user")
