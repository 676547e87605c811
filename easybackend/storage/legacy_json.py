"""Import of the original EasyBackend's ``conversations/<id>.json`` files.

Each file is named after its conversation id and holds a JSON list of
strings shaped ``"User: <prompt>\\n\\n\\nChatGPT: <answer><|im_end|>\\n"``.
Every entry becomes a turn (finish reason ``stop``, model ``imported``, usage
0: no tokens were spent through this server; times from the file's
modification time). The turns are chained after the conversation's head (a
conversation the original made is linear), each becoming the head. Importing
is idempotent: each file's entries are counted per conversation, so a second
run adds only entries appended since.
A file that cannot be read whole is named and skipped; nothing of it is stored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import trio

from ..chat.service import validate_conversation_id
from ..errors import InvalidInput
from .base import ConversationRef, NewTurn, TransferStore

USER_PREFIX = "User: "
SEPARATOR = "\n\n\nChatGPT: "
END_MARK = "<|im_end|>"
IMPORTED_MODEL = "imported"


class MalformedFile(ValueError):
    """A legacy file that is not a JSON list of well-formed entries; the message says where."""


@dataclasses.dataclass
class ImportReport:
    files: int = 0
    conversations: int = 0  # conversations that received turns
    turns: int = 0
    unchanged: int = 0  # files with nothing new
    skipped: list[str] = dataclasses.field(default_factory=list)  # "name: reason"

    def summary(self) -> str:
        line = (
            f"imported {self.turns} turns into {self.conversations} conversations "
            f"from {self.files} files ({self.unchanged} had nothing new)"
        )
        if self.skipped:
            line += f"; skipped {len(self.skipped)} malformed files"
        return line


def parse_entry(entry: object) -> tuple[str, str]:
    """(prompt, answer) of one entry; raises MalformedFile."""
    if not isinstance(entry, str) or not entry.startswith(USER_PREFIX) or SEPARATOR not in entry:
        raise MalformedFile('an entry is not shaped "User: …\\n\\n\\nChatGPT: …"')
    prompt, answer = entry[len(USER_PREFIX) :].split(SEPARATOR, 1)
    answer = answer.removesuffix("\n").removesuffix(END_MARK)
    return prompt, answer


def read_file(path: Path) -> list[tuple[str, str]]:
    """Every (prompt, answer) of one legacy file; raises MalformedFile."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MalformedFile(f"not readable as JSON ({exc.__class__.__name__})") from None
    if not isinstance(entries, list):
        raise MalformedFile("not a JSON list")
    turns = []
    for number, entry in enumerate(entries, 1):
        try:
            turns.append(parse_entry(entry))
        except MalformedFile as exc:
            raise MalformedFile(f"entry {number}: {exc}") from None
    return turns


def _read_with_time(path: Path) -> tuple[list[tuple[str, str]], float]:
    return read_file(path), path.stat().st_mtime


async def import_directory(
    directory: Path, storage: TransferStore, count_tokens: Callable[[str], int], owner: str = ""
) -> ImportReport:
    """Import every ``*.json`` file of ``directory``; see the module docstring."""
    report = ImportReport()
    for path in await trio.to_thread.run_sync(lambda: sorted(directory.glob("*.json"))):
        try:
            conversation_id = validate_conversation_id(path.stem)
            pairs, when = await trio.to_thread.run_sync(_read_with_time, path)
        except (InvalidInput, MalformedFile) as exc:
            reason = (
                "the file name is not a valid conversation id"
                if isinstance(exc, InvalidInput)
                else str(exc)
            )
            report.skipped.append(f"{path.name}: {reason}")
            continue
        turns = [
            NewTurn(
                prompt=prompt,
                prompt_tokens=count_tokens(prompt),
                answer=answer,
                answer_tokens=count_tokens(answer),
                model=IMPORTED_MODEL,
                finish_reason="stop",
                usage_prompt_tokens=0,
                usage_completion_tokens=0,
                created_at=when,
                finished_at=when,
                upstream="",
                pieces="",
            )
            for prompt, answer in pairs
        ]
        added = await storage.import_turns(
            ConversationRef(owner, conversation_id), path.name, turns
        )
        report.files += 1
        report.turns += added
        report.conversations += added > 0
        report.unchanged += added == 0
    return report
