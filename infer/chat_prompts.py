"""``generate --chat FILE.jsonl``: conversations rendered with the checkpoint's chat
template, then generated like any prompt.

Input lines: ``{"id": ..., "messages": [{"role", "content"}, ...]}``. Each conversation
is checked when the file is read (all lines before anything runs), rendered as
transformers' ``apply_chat_template(messages, add_generation_prompt=True)`` renders it
(:mod:`meditron_jax.tokenizer.chat`), and encoded without an extra bos (the template
writes one where the model wants it). A checkpoint without a chat template (a base
model) is refused in one line before its weights load; no template is made up.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from meditron_jax.errors import UserError
from meditron_jax.io.loading import directory_kind
from meditron_jax.tokenizer.chat import ChatTemplate, check_messages


@dataclasses.dataclass
class ChatItem:
    """A conversation; ``ids`` are filled by :func:`render` (the fields generate's
    prompt items have, so the sweep treats both alike)."""
    id: Any
    where: str
    messages: list
    text: str | None = None
    ids: list[int] | None = None


def parse_chat_record(record: dict, where: str) -> ChatItem:
    if "messages" not in record:
        if "prompt" in record or "prompt_ids" in record:
            raise UserError(f'{where}: --chat lines hold "messages"; plain prompts go to '
                            "--prompts")
        raise UserError(f'{where}: missing "messages" (a list of {{"role", "content"}} '
                        "objects)")
    extra = sorted(set(record) - {"id", "messages"})
    if extra:
        raise UserError(f'{where}: unknown field {extra[0]!r}; a --chat line holds "id" and '
                        '"messages"')
    check_messages(record["messages"], where)
    return ChatItem(id=record["id"], where=where, messages=record["messages"])


def load_template(model_dir: str) -> ChatTemplate:
    """The checkpoint's template, or a one-line error for a base model."""
    directory_kind(model_dir)  # a missing or wrong directory is named as such first
    try:
        return ChatTemplate.from_dir(model_dir)
    except UserError as exc:
        raise UserError(f"--chat: {exc}") from None


def render(items: list[ChatItem], template: ChatTemplate, tokenizer, model_dir: str) -> None:
    """Fill each item's ``ids``: the conversation with the generation prompt."""
    if tokenizer is None:
        raise UserError(f"--chat: {model_dir} has no tokenizer (tokenizer.json or "
                        "tokenizer.model); a chat template renders text")
    for item in items:
        item.ids = template.encode_chat(tokenizer, item.messages, add_generation_prompt=True,
                                        where=item.where)
