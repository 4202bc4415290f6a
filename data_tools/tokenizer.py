"""Train the small tokenizer of mmspec's built-in mini models on a conversation corpus.

A byte-level BPE (the GPT-2 pre-tokenizer: words and punctuation split, leading spaces kept) never needs ``<unk>``,
so any user prompt round-trips even though the corpus is the tiny shapes world. Its vocabulary is kept small (about
500-1000 entries) because the shapes world has only a few hundred distinct words and a small vocabulary keeps the mini
model's embedding and LM head small.

The result is a plain transformers fast tokenizer with a LLaVA-1.5-style chat template:
``<s>USER: <image>\\nWhat colour is the star? ASSISTANT: red</s>``. The template itself writes ``<s>``, and the
tokenizer adds no special tokens on its own, so rendering with the template and then tokenizing can never double the
BOS token.

CLI: ``python -m mmspec.data_tools.tokenizer --data FILE.jsonl --out DIR [--vocab-size N]``
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmspec.errors import InputError

logger = logging.getLogger(__name__)

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
# Ids 0-4, in this order (unk, bos, eos as in Llama; pad and image next).
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
DEFAULT_VOCAB_SIZE = 1024

# LLaVA-1.5 conversation format, except that a user turn renders its text first and its images after it, each as
# "\n<image>" (which the processor expands to the image's patch tokens), whatever the order of the content parts.
# With the question before the image, every image token can attend to the question and mark itself as what is asked
# about, and the answer then only has to read the marked tokens. With the image first, the answer must carry the
# question to the image in two hops; a from-scratch decoder had not learned that after 1200 steps (colour answers
# at the 50 % a model that names any colour in the scene gets).
# The assistant reply, its leading space and the closing </s> sit inside {% generation %} so that
# return_assistant_tokens_mask marks exactly what a model learns to produce after the "ASSISTANT:" generation prompt.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] + '\\n' }}{%- endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ (' ' if not loop.first else '') + part['text'] }}"
    "{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '\\n<image>' }}{%- endfor -%}{{- ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT:' -}}{%- generation -%}"
    "{{- ' ' -}}{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{{- eos_token -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; save it to ``out_dir`` (when given) with ``save_pretrained``.

    The vocabulary stops short of ``vocab_size`` when the corpus has no more pairs seen ``min_frequency`` times.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise InputError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No BOS/EOS insertion (the chat template writes them); untrimmed offsets keep assistant-token masks exact.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},  # tokenizer.image_token, read by LlavaProcessor
        chat_template=CHAT_TEMPLATE, model_max_length=2048, clean_up_tokenization_spaces=False)
    logger.info("trained a byte-level BPE tokenizer with %d tokens", len(hf))
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
        logger.info("saved tokenizer to %s", out_dir)
    return hf


def conversation_texts(jsonl_path: str | Path) -> Iterator[str]:
    """One training text per conversation of a training JSONL, laid out as the chat template lays it out."""
    with open(jsonl_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                messages, n_images = record["messages"], len(record.get("images", []))
                turns = []
                for m in messages:
                    content = m["content"]
                    if not isinstance(content, str):
                        n_images += sum(p.get("type") == "image" for p in content)
                        content = " ".join(p["text"] for p in content if p.get("type") == "text")
                    # Images close the first user turn ("\n<image>" each); the special token splits the text, so the
                    # corpus shows the newlines and leaves the image out.
                    if m["role"] == "user" and n_images:
                        content, n_images = content + "\n" * n_images, 0
                    turns.append(f"{m['role'].upper()}: {content}")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{jsonl_path}:{line_no}: not a conversation with 'messages' ({e})") from e
            yield " ".join(turns)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmspec.data_tools.tokenizer",
                                     description="Train the mini models' tokenizer on a conversation JSONL.")
    parser.add_argument("--data", required=True, help="training JSONL (one conversation per line)")
    parser.add_argument("--out", required=True, help="directory to save the tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {args.vocab_size}")
    if not Path(args.data).is_file():
        parser.error(f"cannot read --data {args.data}: no such file")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        texts = list(conversation_texts(args.data))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        parser.error(str(e).splitlines()[0])
    if not texts:
        parser.error(f"--data {args.data} holds no conversations")
    tok = train_tokenizer(texts, args.out, args.vocab_size)
    print(f"{args.out}: {len(tok)} tokens")


if __name__ == "__main__":
    main()
