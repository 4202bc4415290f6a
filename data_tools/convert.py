"""Convert public instruction data sets to mmspec's JSONL training format (see ``jsonl.py``).

    python -m mmspec.data_tools.convert --from llava IN.json --out OUT.jsonl [--image-root DIR] [--strict]
    python -m mmspec.data_tools.convert --from sharegpt IN.json --out OUT.jsonl [--image-root DIR] [--strict]

Formats read (a JSON list, or JSONL with one entry per line):

- ``llava``: LLaVA instruction data, ``{"id": ..., "image": "coco/xx.jpg" (optional), "conversations": [{"from":
  "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}]}``.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": ...}]}`` or
  ``{"messages": [{"role": ..., "content": ...}]}``, with optional ``"images": [...]`` (or a single ``"image"``).

Mapping: human/user -> user, gpt/assistant (and the chatgpt/bard/model aliases) -> assistant, system -> system. The
``<image>`` placeholders, with the newline next to them, are removed from the text: in mmspec's format the images belong
to the first user turn and each target's own chat template places them. Image paths are ``--image-root`` / path
(default root: the input file's directory) and are written relative to OUT's directory, so the JSONL stays valid
wherever it is read from. The entry's other keys (``id``, ...) are kept.

Bad entries (not an object, no conversation, an unknown role, a non-string text, a conversation that does not start
with a user turn, more ``<image>`` placeholders than images) are skipped and counted by reason, with the first few entry
indices, in one warning: one broken record should not cost a 600k-entry conversion. ``--strict`` turns the first one
into an error naming the entry index instead. Empty answers are kept (the training reader skips them, regenerate fills
them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmspec.errors import InputError

from .jsonl import SkipReport, input_file_error, write_jsonl

logger = logging.getLogger(__name__)

FORMATS = ("llava", "sharegpt")
ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
    "system": "system",
}
# the placeholder with the spaces and one newline on either side of it
_PLACEHOLDER = re.compile(r"[ \t]*\n?<image>\n?[ \t]*")


class EntryError(InputError):
    """A malformed entry; `reason` is the short form counted when skipping."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def strip_placeholders(text: str) -> tuple[str, int]:
    """Remove `<image>` placeholders -> (text, how many there were). The text is stripped only when one was found."""
    n = text.count("<image>")
    if not n:
        return text, 0
    return _PLACEHOLDER.sub(" ", text).strip(), n


def _turns(entry: dict) -> list[tuple[str, Any]]:
    if isinstance(entry.get("conversations"), list):
        raw, role_key, text_key = entry["conversations"], "from", "value"
    elif isinstance(entry.get("messages"), list):
        raw, role_key, text_key = entry["messages"], "role", "content"
    else:
        raise EntryError("no conversation", "expected a 'conversations' (or 'messages') list")
    turns = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise EntryError("malformed turn", f"turn {i} needs {role_key!r} and {text_key!r}")
        turns.append((t[role_key], t[text_key]))
    return turns


def convert_entry(entry: Any, fmt: str, image_root: Path, out_dir: Path) -> dict:
    """One source entry -> one mmspec record. Raises EntryError."""
    if not isinstance(entry, dict):
        raise EntryError("not an object", type(entry).__name__)
    refs = entry.get("images", entry.get("image")) if fmt == "sharegpt" else entry.get("image")
    if refs is None:
        refs = []
    elif isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise EntryError("bad image field", "expected a path string or a list of them")
    messages, placeholders = [], 0
    for i, (role, text) in enumerate(_turns(entry)):
        if role not in ROLE_MAP:
            raise EntryError("unknown role", f"turn {i} has role {role!r}; known: {', '.join(sorted(ROLE_MAP))}")
        if not isinstance(text, str):
            raise EntryError("non-string text", f"turn {i}")
        text, n = strip_placeholders(text)
        placeholders += n
        messages.append({"role": ROLE_MAP[role], "content": text})
    if not messages:
        raise EntryError("no conversation", "the conversation is empty")
    first = 1 if messages[0]["role"] == "system" else 0
    if first >= len(messages) or messages[first]["role"] != "user":
        raise EntryError("does not start with a user turn")
    if any(m["role"] == "system" for m in messages[1:]):
        raise EntryError("system turn after the start")
    if placeholders > len(refs):
        raise EntryError("more <image> placeholders than images", f"{placeholders} placeholders, {len(refs)} images")
    images = [_rel(image_root / r, out_dir) for r in refs]
    extra = {k: v for k, v in entry.items() if k not in ("image", "images", "conversations", "messages")}
    return {"images": images, "messages": messages, **extra}


def _rel(path: Path, out_dir: Path) -> str:
    path = path if path.is_absolute() else Path.cwd() / path
    try:
        return os.path.relpath(path, out_dir)
    except ValueError:  # another drive on Windows: no relative path exists
        return str(path)


def load_entries(path: Path) -> list:
    """A JSON list, or JSONL (one entry per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise input_file_error(path, e, "input") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return list(_jsonl_entries(path, text))
    if isinstance(data, dict):  # a single JSONL line, or a file of one object
        return [data]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _jsonl_entries(path: Path, text: str) -> Iterator[Any]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None


def convert(
    src: str | os.PathLike, fmt: str, out: str | os.PathLike, image_root: str | os.PathLike | None = None,
    strict: bool = False,
) -> tuple[int, SkipReport]:
    """Convert `src` (format `fmt`) to JSONL at `out`, written atomically. -> (entries written, skipped entries).
    The SkipReport counts 0-based entry indices."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    root = Path(image_root) if image_root is not None else src.resolve().parent
    out_dir = out.resolve().parent
    report = SkipReport(path=str(src), unit="entries")
    records = []
    for index, entry in enumerate(load_entries(src)):
        try:
            records.append(convert_entry(entry, fmt, root, out_dir))
        except EntryError as e:
            if strict:
                raise InputError(f"{src}: entry {index}: {e}") from None
            report.add(e.reason, index)
    report.kept = len(records)
    if report.total:
        logger.warning("%s", report)
    n = write_jsonl(out, records)
    return n, report


def main(argv: Sequence[str] | None = None) -> int:
    from mmspec.cli import USER_ERRORS, Parser

    p = Parser(prog="python -m mmspec.data_tools.convert",
               description="Convert LLaVA or ShareGPT-style JSON to mmspec's JSONL training format.")
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="source format")
    p.add_argument("src", type=Path, help="input JSON (a list of entries) or JSONL")
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--image-root", type=Path, default=None,
                   help="directory the entries' image paths are relative to (default: the input file's directory)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad entry instead of skipping it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        n, report = convert(args.src, args.fmt, args.out, args.image_root, args.strict)
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"convert: error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {n} conversations to {args.out}" + (f" (skipped {report.total})" if report.total else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
