"""Chat-template tokenization with a loss mask on the assistant's tokens."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


class ChatTemplateError(ValueError):
    """The target's chat template cannot be used to locate assistant tokens."""


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids of a rendered conversation and the assistant-token mask, after truncation."""

    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    full_length: int  # tokens before truncation to max_length

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def num_positions(self) -> int:
        """Trained positions: t >= 1 with loss_mask[t] (position 0 has no prediction)."""
        return int(self.loss_mask[1:].sum())


def chat_template_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's chat template text (enters the cache key)."""
    template = tokenizer.chat_template
    if template is None:
        raise ChatTemplateError("the target's tokenizer has no chat template")
    if isinstance(template, dict):  # named templates
        template = repr(sorted(template.items()))
    return hashlib.sha256(template.encode()).hexdigest()


def render(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the target's chat template writes it."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans [start, end) of every assistant reply.

    A span covers the reply's text and the special token that closes the turn (`<|im_end|>`), which
    the target must also predict; it excludes the role header. Each message is located verbatim in
    the rendered text: as the last occurrence of its content inside the rendering of the
    conversation up to and including it (when that rendering is a prefix of the whole), otherwise as
    the first occurrence after the previous message.
    """
    text = render(tokenizer, messages)
    specials = sorted((t for t in tokenizer.all_special_tokens if t), key=len, reverse=True)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        content = message["content"]
        try:
            prefix = render(tokenizer, messages[: i + 1])
        except Exception:  # some templates refuse a conversation that does not end with a reply
            prefix = None
        window = len(prefix) if prefix and text.startswith(prefix) else None

        def locate(needle: str) -> int:
            if window is not None:
                return text.rfind(needle, cursor, window)
            return text.find(needle, cursor)

        start = _empty_reply_start(tokenizer, messages, i, text) if not content else locate(content)
        if start < 0 and content.strip():
            content = content.strip()
            start = locate(content)
        if start < 0:
            raise ChatTemplateError(
                f"the chat template does not write message {i} ({message['role']}) verbatim; "
                "cannot locate the assistant tokens"
            )
        end = start + len(content)
        cursor = end
        if message["role"] != "assistant":
            continue
        closing = next((s for s in specials if text.startswith(s, end)), None)
        if closing is not None:
            end += len(closing)
        spans.append((start, end))
    return text, spans


def _empty_reply_start(tokenizer, messages, i: int, text: str) -> int:
    """Where an empty (regenerated) reply sits: right after the generation prompt of the turns before it."""
    try:
        header = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
    except Exception:
        return -1
    return len(header) if header and text.startswith(header) else -1


def tokenize_conversation(tokenizer, messages, max_length: int) -> TokenizedConversation:
    """Render with the chat template, tokenize, mask assistant tokens, truncate to max_length tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    offsets = encoding.get("offset_mapping")
    if offsets is None:
        raise ChatTemplateError("the target's tokenizer gives no offsets (a fast tokenizer is required)")
    token_starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:  # a token is trained when it starts inside an assistant span
        mask |= (token_starts >= start) & (token_starts < end)
    full_length = len(ids)
    return TokenizedConversation(ids[:max_length].copy(), mask[:max_length].copy(), full_length)
