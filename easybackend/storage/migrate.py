"""Copy every conversation from one store to another (``easybackend migrate-storage``).

Each conversation goes across whole, through the stores' own
:meth:`~easybackend.storage.base.TransferStore.export_all` and
:meth:`~easybackend.storage.base.TransferStore.import_conversations`: owner, id,
system prompt and its token count, counters, times, every turn as stored
(its id, parent and depth: the tree as it is), the head, the last seq given
(so a deleted turn's number is not handed out again), and the bookkeeping of
``import-json`` (so importing the original's files
again into the new store adds nothing twice). The target is written in
transactions of about :data:`BATCH_ROWS` rows; a copy that fails part-way
leaves whole conversations only, and can be run again with ``--force``.

Meant for a deployment whose servers are stopped: it takes no conversation
locks, so an ask answered during the copy may or may not be in it, and
conversations created after the copy started are left out.
"""

from __future__ import annotations

import contextlib
import dataclasses

from .base import ConversationExport, TransferStore

BATCH_ROWS = 5000  # conversations plus turns written per transaction, roughly


class TargetNotEmpty(Exception):
    """The target already holds conversations and ``force`` was not given."""


@dataclasses.dataclass
class MigrationReport:
    conversations: int = 0
    turns: int = 0
    legacy_imports: int = 0  # import-json bookkeeping records (one per legacy file)

    def add(self, batch: list[ConversationExport]) -> None:
        self.conversations += len(batch)
        self.turns += sum(len(conversation.turns) for conversation in batch)
        self.legacy_imports += sum(len(conversation.legacy_imports) for conversation in batch)

    def summary(self, source: str, target: str) -> str:
        return (
            f"copied {self.conversations} conversations with {self.turns} turns "
            f"({self.legacy_imports} legacy import records) from {source} to {target}"
        )


async def copy_conversations(
    source: TransferStore, target: TransferStore, *, force: bool = False
) -> MigrationReport:
    """Copy every conversation of ``source`` into ``target``; see the module docstring.

    Raises TargetNotEmpty when ``target`` holds conversations and ``force`` is
    false (then nothing is written); with ``force`` a conversation in both is
    replaced by the source's and the target's others are kept.
    """
    if not force:
        held, _ = await target.totals()
        if held:
            raise TargetNotEmpty(
                f"the target already holds {held} conversations; nothing was copied. "
                "Use --force to copy into it anyway (a conversation in both is replaced "
                "by the source's copy, the target's other conversations are kept)"
            )
    # Only the conversations the source holds now: should source and target be one database
    # under two URLs, the copies written would otherwise be read back and copied again.
    remaining, _ = await source.totals()
    report = MigrationReport()
    batch: list[ConversationExport] = []
    rows = 0
    async with contextlib.aclosing(source.export_all()) as conversations:
        async for conversation in conversations:
            if not remaining:
                break
            remaining -= 1
            batch.append(conversation)
            rows += 1 + len(conversation.turns)
            if rows >= BATCH_ROWS:
                await target.import_conversations(batch)
                report.add(batch)
                batch, rows = [], 0
    if batch:
        await target.import_conversations(batch)
        report.add(batch)
    return report
