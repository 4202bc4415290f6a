"""mmspec's training-data format: one conversation per JSONL line, read and written in one place.

    {"images": ["a.png", ...],
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

- ``images`` (optional, default none) belong to the first user turn, in order. A relative path is relative to the
  directory of the JSONL file, so a data set moves together with its images.
- ``messages``: an optional leading ``system`` turn, then a ``user`` turn, then any mix of user and assistant turns.
  Every ``content`` is a string. Extra keys, on the line and on a message, are kept and written back unchanged.

Structural problems (bad JSON, a missing key, a wrong type, an unknown role, a conversation that does not open with a
user turn) are errors in the data set: ``InputError`` (a ``ValueError``) naming the file and the line,
``data.jsonl:17: ...``; a file that cannot be opened is one too, naming the file. Problems of
a single example that a long job should survive (an image file that is missing, an empty or absent answer) skip that
line; the skips are counted per reason in a ``SkipReport`` and logged once as a warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from mmspec.errors import InputError, MissingInputError, UserError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# skip reasons, as counted in SkipReport.counts
MISSING_IMAGE = "missing image file"
EMPTY_ASSISTANT = "empty assistant turn"
NO_ASSISTANT = "no assistant turn"

_FIRST_LINES_KEPT = 5


@dataclass(frozen=True)
class Conversation:
    line_no: int  # 1-based line in the source file
    images: tuple[Path, ...]  # resolved against the JSONL file's directory
    messages: tuple[dict, ...]  # {"role", "content", ...extra keys}
    extra: dict = field(default_factory=dict)  # every other key of the line, kept for writing back
    image_refs: tuple[str, ...] = ()  # the image strings exactly as written in the file

    def record(self, messages: Iterable[dict] | None = None, out_dir: str | os.PathLike | None = None) -> dict:
        """The JSON object for this conversation, optionally with new messages.

        out_dir: the directory of the file the record will be written to. Relative image paths are rewritten to stay
        correct from there (unchanged when it is the source file's directory); absolute paths are kept."""
        refs = self.image_refs or tuple(str(p) for p in self.images)  # built by hand: no refs
        images = list(refs)
        if out_dir is not None:
            out_dir = Path(out_dir).resolve()
            images = [
                ref if Path(ref).is_absolute() or self._resolves_to(out_dir / ref, path) else os.path.relpath(path, out_dir)
                for ref, path in zip(refs, self.images)
            ]
        msgs = [dict(m) for m in (self.messages if messages is None else messages)]
        return {"images": images, "messages": msgs, **self.extra}

    @staticmethod
    def _resolves_to(a: Path, b: Path) -> bool:
        return a.resolve() == b.resolve()

    @property
    def user_texts(self) -> tuple[str, ...]:
        return tuple(m["content"] for m in self.messages if m["role"] == "user")


@dataclass
class SkipReport:
    """Lines skipped by reason, with the first few line numbers of each."""

    path: str = ""
    kept: int = 0
    unit: str = "lines"  # what the numbers in first_lines count
    counts: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, line_no: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lines = self.first_lines.setdefault(reason, [])
        if len(lines) < _FIRST_LINES_KEPT:
            lines.append(line_no)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return f"{self.path}: kept all {self.kept} conversations"
        parts = []
        for reason, n in sorted(self.counts.items()):
            more = ", ..." if n > len(self.first_lines[reason]) else ""
            parts.append(f"{n} x {reason} ({self.unit} {', '.join(map(str, self.first_lines[reason]))}{more})")
        return f"{self.path}: kept {self.kept} conversations, skipped {self.total}: " + "; ".join(parts)


def input_file_error(path: str | os.PathLike, error: OSError, what: str = "file") -> UserError:
    """The UserError for a user's file that cannot be opened (missing, a directory, no permission), naming it."""
    if isinstance(error, FileNotFoundError):
        return MissingInputError(f"{what} {str(path)!r} does not exist")
    return InputError(f"cannot read {what} {str(path)!r}: {error.strerror or error}")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every non-blank line; a file that cannot be read is a UserError naming it."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise input_file_error(path, e, "data file") from None
    line_no = 0
    with f:
        try:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield line_no, line
        except UnicodeDecodeError as e:  # decoded in blocks, so the line is where the bad bytes were read
            raise InputError(f"{path}:{line_no + 1}: not UTF-8 text ({e.reason})") from None


def parse_conversation(
    obj: Any, line_no: int, base_dir: Path, where: str = "", check_images: bool = True, require_answers: bool = True
) -> Conversation | str:
    """One decoded line -> a Conversation, or the skip reason (a str).

    Structural errors raise InputError prefixed by `where`."""

    def bad(msg: str) -> InputError:
        return InputError(f"{where}{msg}")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object with 'messages' (and optional 'images'), got {type(obj).__name__}")
    if "messages" not in obj:
        raise bad("missing key 'messages'")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise bad(f"messages[{i}] is missing key {key!r}")
        if m["role"] not in ROLES:
            raise bad(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise bad(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise bad(f"messages[{i}] is a system turn; only the first turn may be a system turn")
    first = 1 if messages[0]["role"] == "system" else 0
    if first >= len(messages) or messages[first]["role"] != "user":
        raise bad("the conversation must start with a user turn (after an optional system turn)")

    refs = obj.get("images", [])
    if refs is None:
        refs = []
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise bad("'images' must be a list of non-empty path strings")
    images = tuple(p if p.is_absolute() else base_dir / p for p in map(Path, refs))

    if check_images and not all(p.is_file() for p in images):
        return MISSING_IMAGE
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if require_answers and not answers:
        return NO_ASSISTANT
    if require_answers and any(not a.strip() for a in answers):
        return EMPTY_ASSISTANT
    extra = {k: v for k, v in obj.items() if k not in ("images", "messages")}
    return Conversation(line_no, images, tuple(dict(m) for m in messages), extra, tuple(refs))


def read_conversations(
    path: str | os.PathLike, check_images: bool = True, require_answers: bool = True
) -> tuple[list[Conversation], SkipReport]:
    """Read a whole JSONL file. Structural errors raise InputError naming `file:line`; a line whose image file is
    missing (when check_images) or, when require_answers, that has no assistant turn or an empty one, is skipped and
    counted. `require_answers=False` is for question-only files whose answers a target will write (regenerate)."""
    path = Path(path)
    base_dir = path.resolve().parent
    report = SkipReport(path=str(path))
    out: list[Conversation] = []
    for line_no, text in iter_lines(path):
        where = f"{path}:{line_no}: "
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}not valid JSON ({e.msg} at column {e.colno})") from None
        conv = parse_conversation(obj, line_no, base_dir, where, check_images, require_answers)
        if isinstance(conv, str):
            report.add(conv, line_no)
        else:
            out.append(conv)
    report.kept = len(out)
    if report.total:
        logger.warning("%s", report)
    return out, report


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records, one JSON object per line, atomically: a temporary file next to `path` renamed over it, so a
    crash leaves either the old file or the complete new one. Returns the number of lines written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a file where a folder should be, no permission
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(dumps(rec) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def dumps(record: dict) -> str:
    """One line of the format (UTF-8 text kept readable, no newline inside)."""
    return json.dumps(record, ensure_ascii=False)


__all__ = [
    "Conversation", "SkipReport", "ROLES", "MISSING_IMAGE", "EMPTY_ASSISTANT", "NO_ASSISTANT",
    "input_file_error", "iter_lines", "parse_conversation", "read_conversations", "write_jsonl", "dumps",
]
