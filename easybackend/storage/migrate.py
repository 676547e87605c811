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

Then the keys and the usage go across (:func:`copy_keys_and_usage`): every
stored key as it is (the digest of its secret, so the same secrets keep
working; revoked and disabled ones too, so a revoked secret stays revoked),
and every row of usage (key, day, model), so budgets and ``/usage`` go on
where they were. A key or a usage row the target already holds is kept as
the target has it, never doubled: a second run copies nothing twice.

Meant for a deployment whose servers are stopped: it takes no conversation
locks, so an ask answered during the copy may or may not be in it, and
conversations created after the copy started are left out.
"""

from __future__ import annotations

import contextlib
import dataclasses

from .base import ConversationExport, TransferStore

BATCH_ROWS = 5000  # conversations plus turns written per transaction, roughly
EVERY_DAY = ("0000-01-01", "9999-12-31")  # the days of usage copied: all


class TargetNotEmpty(Exception):
    """The target already holds conversations and ``force`` was not given."""


@dataclasses.dataclass
class MigrationReport:
    conversations: int = 0
    turns: int = 0
    legacy_imports: int = 0  # import-json bookkeeping records (one per legacy file)
    keys: int = 0  # stored keys copied
    keys_kept: int = 0  # keys the target held already under the same name (left as they were)
    usage_rows: int = 0  # usage rows (key, day, model) copied

    def add(self, batch: list[ConversationExport]) -> None:
        self.conversations += len(batch)
        self.turns += sum(len(conversation.turns) for conversation in batch)
        self.legacy_imports += sum(len(conversation.legacy_imports) for conversation in batch)

    def summary(self, source: str, target: str) -> str:
        kept = f", {self.keys_kept} kept as the target had them" if self.keys_kept else ""
        return (
            f"copied {self.conversations} conversations with {self.turns} turns "
            f"({self.legacy_imports} legacy import records), {self.keys} keys{kept} and "
            f"{self.usage_rows} usage rows from {source} to {target}"
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
    await copy_keys_and_usage(source, target, report)
    return report


async def copy_keys_and_usage(
    source: TransferStore, target: TransferStore, report: MigrationReport
) -> None:
    """Copy the stored keys and the usage into ``target`` (see the module docstring),
    counting them in ``report``. Each key is its own write; the usage one transaction."""
    for record in await source.keys():
        if await target.create_key(record):
            report.keys += 1
        else:
            report.keys_kept += 1
    rows = await source.usage_rows(None, EVERY_DAY[0], EVERY_DAY[1])
    report.usage_rows = await target.import_usage(rows)
