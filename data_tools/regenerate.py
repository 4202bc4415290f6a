"""Regenerate the answers of a training set with the target itself (the ViSpec data recipe, Kang et al. 2025).

A drafter is only as good as its agreement with the target, so it should learn from the target's own answers, not from
the human or GPT-4 answers a public data set ships with. Each user turn is put to the target with a suffix that asks for
a long answer (``DEFAULT_PROMPT_SUFFIX``, override with ``--prompt-suffix``; ``--prompt-suffix ""`` disables it), and
the target's greedy answer replaces the assistant turn. The suffix is appended to every user turn of the prompt the
target sees, and only there: the saved conversation keeps the original user text. Multi-turn conversations are answered
turn by turn, each turn given the regenerated history. A conversation whose last turn is a user turn gets the target's
answer appended, so a file of questions alone (``{"images": [...], "messages": [{"role": "user", ...}]}``) works too.

    python -m mmspec.data_tools.regenerate --target T --data IN.jsonl --out OUT.jsonl \
        [--prompt-suffix TEXT] [--max-new-tokens N] [--batch-size N] [--device D] [--dtype D]
    accelerate launch -m mmspec.data_tools.regenerate ...     # data-parallel, one target per process
    torchrun --nproc_per_node N -m mmspec.data_tools.regenerate ...   # the same on CPU (or accelerate launch --cpu)

- Batched: several conversations per ``generate`` call, left-padded.
- Resumable: an existing OUT is continued. Its complete lines are the first conversations already done (checked against
  the input's user text), a partial last line left by a crash is cut off, and every finished batch is flushed.
- Data-parallel: under ``accelerate launch`` (or torchrun) each process takes a strided share of each round of
  ``batch_size x processes`` conversations; the results are gathered and only the main process writes, in input order,
  so OUT is always a prefix of the full result.
- Lines skipped by the reader (missing image files) are logged with counts and not written. Input images that exist
  but cannot be decoded stop the run with an error naming the line; fix or drop it and run again to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm
from transformers import AutoProcessor, AutoTokenizer, BatchFeature

from mmspec.adapters import Adapter, adapter_for
from mmspec.errors import InputError, UserError
from mmspec.images import cast_pixels, load_images
from mmspec.registry import target_config

from .jsonl import Conversation, dumps, input_file_error, read_conversations

logger = logging.getLogger(__name__)

# Asks for the long, detailed answers the ViSpec recipe trains on. Appended to the user text for generation only.
DEFAULT_PROMPT_SUFFIX = " Please answer in detail."
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 8

# Families whose left-padded batches do not reproduce batch-size-1 greedy output are run one conversation per call.
# Empty: LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, the generic (Mistral3) VLM and plain causal LMs all give identical
# greedy tokens at batch sizes 1 and 3 in fp32 (tests/test_data_tools.py checks llava and qwen2_vl). Note that in
# bf16/fp16 padding can reorder float sums and, rarely, flip a near-tie argmax; that changes style data, not
# correctness.
UNBATCHED_ADAPTERS: frozenset[str] = frozenset()


class TargetGenerator:
    """A target loaded for plain greedy generation of batches of chat prompts."""

    def __init__(self, target: str | os.PathLike, device: str | torch.device, dtype: torch.dtype | None = None) -> None:
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        path, config = target_config(target)  # built-in names, local directories, HF ids already cached
        self.adapter: Adapter = adapter_for(config)
        self.model = self.adapter.auto_class.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        ).to(device).eval()
        loader = AutoProcessor if self.adapter.multimodal else AutoTokenizer
        self.processor = loader.from_pretrained(path, local_files_only=True)
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None) and not getattr(self.processor, "chat_template", None):
            raise InputError(f"target {str(target)!r} has no chat template, so conversations cannot be put to it")
        tok.padding_side = "left"  # generation continues every row right after its own prompt
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.device = device
        self.max_batch = 1 if self.adapter.name in UNBATCHED_ADAPTERS else None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def chat(self, messages: Sequence[dict], n_images: int, suffix: str) -> list[dict]:
        """Our messages -> the target's chat-template messages: the suffix on every user turn, the images as parts
        of the first user turn (before its text, as adapters.base does), part lists throughout for VLM templates."""
        turns = [{**m, "content": m["content"] + suffix} if m["role"] == "user" else m for m in messages]
        return self.adapter.chat(turns, n_images)

    def inputs(self, chats: Sequence[list[dict]], images: Sequence[list]) -> BatchFeature:
        """A left-padded batch. One row is exactly what `adapter.prepare` builds for the same messages."""
        if not self.adapter.multimodal:
            if any(images):
                raise InputError("this target is a text-only language model and cannot take images")
            texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
            flat = [im for ims in images for im in ims]
            kwargs = {"images": flat} if flat else {}
            batch = self.processor(text=texts, return_tensors="pt", padding=True, **kwargs)
        batch = batch.to(self.device)
        return cast_pixels(batch, self.model.dtype)

    @torch.inference_mode()
    def generate(self, chats: Sequence[list[dict]], images: Sequence[list], max_new_tokens: int) -> list[str]:
        step = self.max_batch or len(chats)
        texts: list[str] = []
        for i in range(0, len(chats), step):
            batch = self.inputs(chats[i : i + step], images[i : i + step])
            out = self.model.generate(
                **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id
            )
            new = out[:, batch["input_ids"].shape[1] :]  # rows that stopped early are filled with pad: special, dropped
            texts.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return texts


def _answer_slots(messages: Sequence[dict]) -> list[int]:
    """Indices of the assistant turns to regenerate; one past the end when the last turn is a question."""
    slots = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if messages[-1]["role"] == "user":
        slots.append(len(messages))
    return slots


def _regenerate_batch(
    gen: TargetGenerator, convs: Sequence[Conversation], data: Path, suffix: str, max_new_tokens: int
) -> list[list[dict]]:
    """The conversations with every assistant turn rewritten by the target, turn k of all rows in one call."""
    images = []
    for c in convs:
        try:
            images.append(load_images([str(p) for p in c.images]))
        except UserError as e:
            raise InputError(f"{data}:{c.line_no}: {e}") from None
    states = [[dict(m) for m in c.messages] for c in convs]
    slots = [_answer_slots(s) for s in states]
    for k in range(max((len(s) for s in slots), default=0)):
        rows = [i for i in range(len(convs)) if k < len(slots[i])]
        chats = [gen.chat(states[i][: slots[i][k]], len(images[i]), suffix) for i in rows]
        answers = gen.generate(chats, [images[i] for i in rows], max_new_tokens)
        for i, text in zip(rows, answers):
            j = slots[i][k]
            if j == len(states[i]):
                states[i].append({"role": "assistant", "content": text})
            else:
                states[i][j] = {**states[i][j], "content": text}
    return states


def _resume_point(out: Path, convs: Sequence[Conversation], truncate: bool) -> int:
    """How many conversations OUT already holds. Cuts a partial last line (a crash mid-write) when `truncate`."""
    if not out.exists():
        return 0
    try:
        data = out.read_bytes()
    except OSError as e:
        raise input_file_error(out, e, "--out") from None
    lines = data.split(b"\n")
    partial = lines.pop()  # b"" when the file ends with a newline
    done = 0
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            users = tuple(m["content"] for m in rec["messages"] if m["role"] == "user")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            msg = f"{out}:{line_no}: cannot resume, not a line regenerate writes ({e}); use a new --out"
            raise InputError(msg) from None
        if done >= len(convs):
            raise InputError(f"{out} holds more conversations than the input has; use a new --out")
        if users != convs[done].user_texts:
            raise InputError(
                f"{out}:{line_no}: its user text differs from input line {convs[done].line_no}: OUT was not made "
                f"from this input; use a new --out"
            )
        done += 1
    if partial and truncate:
        logger.warning("%s: dropping a partial last line left by an interrupted run", out)
        try:
            with open(out, "r+b") as f:
                f.truncate(len(data) - len(partial))
        except OSError as e:
            raise InputError(f"cannot write --out {str(out)!r}: {e.strerror or e}") from None
    return done


def _open_out(out: Path):
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return open(out, "a", encoding="utf-8")
    except OSError as e:  # a directory, no permission
        raise InputError(f"cannot write --out {str(out)!r}: {e.strerror or e}") from None


def regenerate(
    target: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> int:
    """Write OUT with the target's own greedy answers to every user turn of DATA; returns the lines written by this
    call (resuming an existing OUT). Under accelerate/torchrun every process must call it; only the main one writes."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    if int(max_new_tokens) < 1 or int(batch_size) < 1:
        raise InputError(f"max_new_tokens and batch_size must be positive, got {max_new_tokens} and {batch_size}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise InputError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    data, out = Path(data), Path(out)
    if out.exists() and data.exists() and out.resolve() == data.resolve():
        raise InputError("--out must differ from --data (the input is never overwritten)")
    # without CUDA, accelerate sets up gloo data parallelism (torchrun, accelerate launch --cpu) only when cpu=True
    cpu = not torch.cuda.is_available() or (device is not None and device.type == "cpu")
    state = PartialState(cpu=cpu)
    convs, _ = read_conversations(data, check_images=True, require_answers=False)
    if state.is_main_process:
        done = [_resume_point(out, convs, truncate=True)]
    else:
        done = [0]
    done = broadcast_object_list(done)[0]
    if done:
        logger.info("%s: resuming after %d of %d conversations", out, done, len(convs))
    todo = convs[done:]
    gen = TargetGenerator(target, device if device is not None else state.device, dtype)
    with_images = next((c for c in todo if c.images), None)
    if with_images is not None and not gen.adapter.multimodal:
        raise InputError(f"{data}:{with_images.line_no}: has images, but target {str(target)!r} is a text-only model")
    out_dir = out.resolve().parent

    per_round = batch_size * state.num_processes
    written = 0
    bar = tqdm(total=len(todo), desc="regenerate", unit="conv", disable=not state.is_main_process)
    writer = _open_out(out) if state.is_main_process else None
    try:
        for start in range(0, len(todo), per_round):
            # strided share: process p takes items p, p+P, ... of this round; the union is the round, contiguous
            mine = list(range(start + state.process_index, min(start + per_round, len(todo)), state.num_processes))
            batch = [todo[i] for i in mine]
            states = _regenerate_batch(gen, batch, data, prompt_suffix, max_new_tokens) if batch else []
            results = gather_object([(i, todo[i].record(s, out_dir)) for i, s in zip(mine, states)])
            if writer is not None:
                results.sort(key=lambda r: r[0])
                writer.write("".join(dumps(rec) + "\n" for _, rec in results))
                writer.flush()
                os.fsync(writer.fileno())
            written += len(results)
            bar.update(len(results))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    state.wait_for_everyone()
    return written


def build_parser() -> argparse.ArgumentParser:
    from mmspec.cli import Parser

    p = Parser(
        prog="python -m mmspec.data_tools.regenerate",
        description="Rewrite the assistant turns of a JSONL data set with the target's own greedy answers (ViSpec).",
    )
    p.add_argument("--target", required=True, help="built-in name, local directory or cached Hugging Face id")
    p.add_argument("--data", required=True, type=Path, help="input JSONL (one conversation per line)")
    p.add_argument("--out", required=True, type=Path, help="output JSONL; an existing one is resumed")
    p.add_argument("--prompt-suffix", default=DEFAULT_PROMPT_SUFFIX,
                   help=f"appended to each user turn for generation only (default {DEFAULT_PROMPT_SUFFIX!r})")
    p.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="conversations per process")
    p.add_argument("--device", default=None, help="default: this process's accelerate device (cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    from mmspec.cli import run_guarded

    args = build_parser().parse_args(argv)

    def body() -> int:
        n = regenerate(args.target, args.data, args.out, args.prompt_suffix, args.max_new_tokens, args.batch_size,
                       args.device, args.dtype)
        logger.info("wrote %d conversations to %s", n, args.out)
        return 0

    return run_guarded("regenerate", args.verbose, body)


if __name__ == "__main__":
    raise SystemExit(main())
