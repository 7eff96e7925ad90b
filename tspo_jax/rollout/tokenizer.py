"""Tokenizers for rollouts (host side): load a local HF tokenizer, build a tiny one, see token bytes.

The policy's tokenizer is always a `transformers.AutoTokenizer` loaded from a local directory (the user's
Qwen2.5 tokenizer, or one made by `build_tiny_tokenizer` for the tiny model). Rollouts never decode text
and re-encode it: the agent works on token ids, and reads text only through `token_bytes`, the exact
bytes each id stands for, which is also what the stop matcher runs on.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import transformers

# Qwen2.5's special tokens, in Qwen's order (ids 151643.. in the real vocabulary).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# A directory holds a tokenizer when it has one of these (transformers' fast / slow tokenizer files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")

# ChatML, as Qwen2.5 formats chats; no default system message, so the prompt is exactly the user's text.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(texts: Iterable[str], out_dir: str | pathlib.Path, *, vocab_size: int = 512) -> pathlib.Path:
    """Train a small byte-level BPE tokenizer with Qwen2.5's pipeline and save it as an HF tokenizer directory.

    Same pre-tokenizer regex, byte-level alphabet and special tokens as Qwen2.5 (`<|endoftext|>` = pad,
    `<|im_end|>` = eos) and a ChatML chat template, so everything downstream treats it like the real one.
    Special tokens get ids 0, 1, 2; `vocab_size` counts them and the 256 byte tokens.
    Returns `out_dir`, loadable with `load_tokenizer`.
    """
    if vocab_size < 256 + len(QWEN_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens and 3 "
                         "special tokens")
    texts = list(texts)
    if not texts:
        raise ValueError("build_tiny_tokenizer needs at least one training text")
    empty = transformers.Qwen2Tokenizer()  # Qwen2.5's normalizer, pre-tokenizer and decoder, no vocabulary yet
    tokenizer = empty.train_new_from_iterator(texts, vocab_size=vocab_size,
                                              new_special_tokens=list(QWEN_SPECIAL_TOKENS),
                                              show_progress=False)  # its bar prints blank lines into logs
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.chat_template = CHATML_TEMPLATE
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str | pathlib.Path) -> transformers.PreTrainedTokenizerBase:
    """Load an HF tokenizer from a local directory (never a model hub), checking what rollouts rely on."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
                                "tokenizer files there")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # transformers raises many types; name the directory whatever it was
        raise ValueError(f"cannot load a tokenizer from {path}: {error}") from error
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer in {path} has no chat_template (tokenizer_config.json / chat_template.jinja)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos_token")
    token_bytes(tokenizer)  # fails early, naming the token, if the tokenizer is not byte-level
    return tokenizer


def encode_chat(tokenizer: transformers.PreTrainedTokenizerBase, messages: Sequence[dict]) -> np.ndarray:
    """Chat messages -> prompt token ids ending with the assistant header. Returns int32[T]."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)


def stop_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Ids that end a turn like EOS: the tokenizer's eos plus ChatML's `<|im_end|>` and `<|endoftext|>`."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[token] for token in (IM_END, ENDOFTEXT) if token in vocab}
    return tuple(sorted(ids))


@functools.cache
def byte_level_decoder() -> dict[str, int]:
    """Character -> byte of GPT-2's reversible byte <-> printable-unicode map, in which byte-level BPE
    vocabularies (Qwen2.5's included) write their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: transformers.PreTrainedTokenizerBase, vocab_size: int | None = None) -> tuple[bytes, ...]:
    """The exact bytes each token id stands for: `result[i]` for i in [0, vocab_size).

    Added/special tokens stand for their content's UTF-8; ids the tokenizer does not know (a model's
    embedding table is often padded past the tokenizer, 151,936 vs 151,665 on Qwen2.5) stand for b"".
    Cached on the tokenizer object (it is immutable for our purposes).
    """
    cached = getattr(tokenizer, "_tspo_token_bytes", None)
    if cached is None:
        decoder = byte_level_decoder()
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        vocab = tokenizer.get_vocab()
        table: list[bytes] = [b""] * (max(vocab.values()) + 1)
        for piece, token_id in vocab.items():
            if token_id in added:
                table[token_id] = added[token_id].encode("utf-8")
                continue
            try:
                table[token_id] = bytes(decoder[ch] for ch in piece)
            except KeyError as error:
                raise ValueError(
                    f"tokenizer {tokenizer.name_or_path!r} is not byte-level BPE: token {token_id} {piece!r} has "
                    f"character {error.args[0]!r} outside the byte alphabet (rollouts need exact token bytes)"
                ) from None
        cached = tuple(table)
        tokenizer._tspo_token_bytes = cached
    if vocab_size is None:
        return cached
    if vocab_size < len(cached):
        raise ValueError(f"model vocab_size={vocab_size} is smaller than the tokenizer's {len(cached)} ids")
    return cached + (b"",) * (vocab_size - len(cached))


def tokens_to_text(table: Sequence[bytes], ids: Iterable[int]) -> str:
    """Text of a token sequence from its bytes; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
    return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
