"""The outbox database (SQLite, WAL, synchronous=FULL): the agent's only durable state.

Owns the schema and every SQL statement. Synchronous and single-connection: the agent calls
it from one dedicated thread (see ``Committer``), the CLI calls it directly. Durability is
verified at open: a store that cannot guarantee WAL + FULL refuses to open.

Tables:
  events       one row per business event (seq, deterministic id, envelope body)
  deliveries   one row per (sink, event): 0 pending, 1 delivered, 2 dead (+ last error)
  rule_state   rules' open correlations and watermarks, by (rule, key)
  inputs       ids of consumed device messages (keyed by id), pruned after the dedup
               retention: the dedup record, consulted when the in-memory filter in front of
               it (``SeenIds``) says "maybe" (see ``input_seen``)
  quarantine   malformed device payloads set aside for inspection
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import StoreError
from .batch import SealedBatch

log = logging.getLogger(__name__)

PENDING, DELIVERED, DEAD = 0, 1, 2
VACUUM_CONVERT_MAX_BYTES = 256 * 2**20  # an older outbox up to this is converted at open
PRUNE_CHUNK = 2000  # rows per pruning transaction (commits go on between them)
PRUNE_WAL_PER_ROW = 1024  # the least pruning one event is taken to write to the WAL (bytes)
PRUNE_TIGHT_BYTES = 256 * 2**20  # free space under which pruning chunks are sized to it
VACUUM_CHUNK_PAGES = 4096  # pages given back per incremental vacuum step
# What SQLite says when a write finds no room: SQLITE_FULL (ENOSPC on a write, or
# max_page_count reached); growing the shared-memory index or the WAL can fail as an I/O
# error instead, which we take for the same only when the filesystem is indeed out of space.
_FULL_IOERRS = {"SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_TRUNCATE"}
_LOW_FREE_BYTES = 1 << 20
RESERVE_FILE_MAX_BYTES = 64 * 2**20  # the reserve file (see ``make_reserve``) is at most this
STATE_NAMES = {PENDING: "pending", DELIVERED: "delivered", DEAD: "dead"}
SCHEMA_VERSION = 2  # 2: inputs keyed by msg_id


class OutboxFull(StoreError):
    """A write found no room (disk full, or the outbox's hard size limit). Nothing of the
    transaction was written; the same write may be retried once there is room."""


@dataclass(slots=True)
class Pending:
    seq: int
    id: str
    type: str
    subject: str
    body: str
    attempts: int


class Store:
    def __init__(self, path: str | Path, *, check_integrity: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open outbox {self.path}: {exc}") from exc
        self.conn = conn
        self._reader: sqlite3.Connection | None = None  # for ``input_seen``
        # Sizes as of the last commit or ``compact`` (read from SQLite's header and one stat
        # of the WAL: cheap enough for every commit, never per event).
        self.used_bytes = 0  # pages in use + WAL: what the quota counts
        self.file_bytes = 0  # the database file
        self.wal_bytes = 0
        self._prune_from = 0  # events below this seq were examined by ``prune_step``
        # A file holding space for the outbox's own use when its disk is full (see
        # ``make_reserve``): released at the first write that finds no room.
        self.reserve_path = Path(f"{self.path}-reserve")
        self.reserve_bytes = 0  # its size when present (0: none wanted)
        self.reserve_held = False  # it exists, at its size
        self.wal_limit_bytes = 0  # what the WAL is cut back to (``set_limits``)
        self.db = sqlite_utils.Database(conn)
        self._durable()
        if check_integrity:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"outbox {self.path} failed integrity_check: {ok}")
        self._schema()
        self.measure()

    # --- opening ---------------------------------------------------------------------------

    def _durable(self) -> None:
        c = self.conn
        try:
            # Freed pages go back to the filesystem (``compact``): set before the first
            # table exists; an older outbox is converted by a VACUUM when small enough.
            fresh = c.execute("PRAGMA page_count").fetchone()[0] == 0
            if fresh:
                c.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            c.execute("PRAGMA synchronous=FULL")
            sync = c.execute("PRAGMA synchronous").fetchone()[0]
            c.execute("PRAGMA busy_timeout=5000")
            # Checkpoint every ~16 MB of WAL instead of 4 MB: pages rewritten by many group
            # commits (index tails, rule state) reach the main file once, not four times.
            c.execute("PRAGMA wal_autocheckpoint=4000")
            c.execute("PRAGMA foreign_keys=OFF")
            # Freed pages are not zeroed (this build's default): zeroing doubles what pruning
            # writes to the WAL, which a nearly full disk may not have room for.
            c.execute("PRAGMA secure_delete=FAST")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot configure outbox {self.path}: {exc}") from exc
        if mode.lower() != "wal" or sync != 2:
            raise StoreError(
                f"outbox {self.path} is not durable: journal_mode={mode}, synchronous={sync} "
                "(need wal and 2=FULL)"
            )
        self.page_size = c.execute("PRAGMA page_size").fetchone()[0]
        if c.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            size = c.execute("PRAGMA page_count").fetchone()[0] * self.page_size
            if size <= VACUUM_CONVERT_MAX_BYTES:
                try:
                    c.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    c.execute("VACUUM")
                except sqlite3.Error as exc:
                    log.warning("outbox %s not converted to incremental vacuum: %s", self.path, exc)
            else:
                log.warning(
                    "outbox %s (%d MB) predates incremental vacuum: pruned space is reused but "
                    "the file does not shrink (a VACUUM while the agent is stopped converts it)",
                    self.path, size // 2**20,
                )

    def _schema(self) -> None:
        db = self.db
        with self.conn:
            db.execute("BEGIN IMMEDIATE")
            if "meta" not in db.table_names():
                db["meta"].create({"key": str, "value": str}, pk="key")
                db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)})
            else:
                v = int(db["meta"].get("schema_version")["value"])
                if v > SCHEMA_VERSION:
                    raise StoreError(f"outbox schema {v} is newer than this agent ({SCHEMA_VERSION})")
            if "events" not in db.table_names():
                db["events"].create(
                    {
                        "seq": int,
                        "id": str,
                        "type": str,
                        "subject": str,
                        "time": float,
                        "created": float,
                        "body": str,
                    },
                    pk="seq",
                    not_null={"id", "type", "body"},
                )
                db["events"].create_index(["id"], unique=True)
            if "deliveries" not in db.table_names():
                db.execute(
                    "CREATE TABLE deliveries (sink TEXT NOT NULL, seq INTEGER NOT NULL, "
                    "state INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, "
                    "last_error TEXT, updated REAL, PRIMARY KEY (sink, seq)) WITHOUT ROWID"
                )
                db.execute(
                    "CREATE INDEX deliveries_pending ON deliveries(sink, seq) WHERE state = 0"
                )
                db.execute("CREATE INDEX deliveries_seq ON deliveries(seq)")
            if "rule_state" not in db.table_names():
                db.execute(
                    "CREATE TABLE rule_state (rule TEXT NOT NULL, key TEXT NOT NULL, "
                    "value TEXT NOT NULL, PRIMARY KEY (rule, key)) WITHOUT ROWID"
                )
            if "inputs" in db.table_names() and "WITHOUT ROWID" not in (
                db["inputs"].schema.upper()
            ):  # schema 1: ids appended without a key, only read at start
                db.execute("DROP INDEX IF EXISTS inputs_seen")
                db.execute("ALTER TABLE inputs RENAME TO inputs_v1")
            if "inputs" not in db.table_names():
                db.execute(
                    "CREATE TABLE inputs (msg_id TEXT PRIMARY KEY, seen REAL NOT NULL) "
                    "WITHOUT ROWID"
                )
                db.execute("CREATE INDEX inputs_seen ON inputs(seen)")
            if "inputs_v1" in db.table_names():
                db.execute(
                    "INSERT INTO inputs(msg_id, seen) SELECT msg_id, max(seen) FROM inputs_v1 "
                    "GROUP BY msg_id"
                )
                db.execute("DROP TABLE inputs_v1")
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)]
            )
            if "quarantine" not in db.table_names():
                db["quarantine"].create(
                    {
                        "id": int,
                        "device": str,
                        "source": str,
                        "reason": str,
                        "detail": str,
                        "payload": bytes,
                        "received": float,
                    },
                    pk="id",
                )

    def set_limits(self, quota_bytes: int) -> None:
        """Bound the outbox for a disk quota: the WAL is checkpointed and cut back to a
        sixteenth of it, or of its filesystem when smaller (at most 16 MB), and the file
        cannot grow past the quota plus an eighth (a hard stop, met as ``OutboxFull``,
        should the soft pause come too late)."""
        ps = self.page_size
        room = min(quota_bytes, self.disk_total_bytes() or quota_bytes)
        wal_pages = max(100, min(4000, room // 16 // ps))
        c = self.conn
        c.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        c.execute(f"PRAGMA journal_size_limit={wal_pages * ps}")
        self.wal_limit_bytes = wal_pages * ps
        c.execute(f"PRAGMA max_page_count={(quota_bytes + quota_bytes // 8) // ps}")

    def measure(self) -> int:
        """Refresh and return ``used_bytes``."""
        c = self.conn
        pages = c.execute("PRAGMA page_count").fetchone()[0]
        free = c.execute("PRAGMA freelist_count").fetchone()[0]
        try:
            self.wal_bytes = os.stat(f"{self.path}-wal").st_size
        except OSError:
            self.wal_bytes = 0
        self.file_bytes = pages * self.page_size
        self.used_bytes = (pages - free) * self.page_size + self.wal_bytes
        return self.used_bytes

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            self.conn.close()

    # --- the agent's path ------------------------------------------------------------------

    def max_seq(self) -> int:
        return self.conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    def commit(self, b: SealedBatch) -> bool:
        """Make one group-commit batch durable in a single transaction.

        Returns True if every event was new. An event whose id is already in the outbox (a
        replay after the input dedup window) is not stored again; its deliveries then go to
        the stored event's sequence number, and the caller must not trust the batch's own.
        """
        c = self.conn
        all_new = True
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                if b.events:
                    cur = c.executemany(
                        "INSERT INTO events(seq, id, type, subject, time, created, body) "
                        "VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING",
                        b.events,
                    )
                    all_new = cur.rowcount == len(b.events)
                # ``updated`` is set from the start: settling a delivery then rewrites its
                # row in place (no row grows, no page splits), which a nearly full disk
                # has room for.
                if b.routes and all_new:
                    now = b.events[0][5]
                    c.executemany(
                        "INSERT OR IGNORE INTO deliveries(sink, seq, state, attempts, updated) "
                        "VALUES (?, ?, 0, 0, ?)",
                        [(sink, seq, now) for sink, seq, _ in b.routes],
                    )
                elif b.routes:
                    c.executemany(
                        "INSERT OR IGNORE INTO deliveries(sink, seq, state, attempts, updated) "
                        "SELECT ?, seq, 0, 0, created FROM events WHERE id = ?",
                        [(sink, id_) for sink, _, id_ in b.routes],
                    )
                if b.state_upserts:
                    c.executemany(
                        "INSERT INTO rule_state(rule, key, value) VALUES (?,?,?) "
                        "ON CONFLICT(rule, key) DO UPDATE SET value = excluded.value",
                        b.state_upserts,
                    )
                if b.state_deletes:
                    c.executemany("DELETE FROM rule_state WHERE rule = ? AND key = ?", b.state_deletes)
                if b.inputs:  # an id seen again after the retention is remembered anew
                    c.executemany(
                        "INSERT INTO inputs(msg_id, seen) VALUES (?,?) "
                        "ON CONFLICT(msg_id) DO UPDATE SET seen = excluded.seen",
                        b.inputs,
                    )
                if b.quarantine:
                    c.executemany(
                        "INSERT INTO quarantine(device, source, reason, detail, payload, received) "
                        "VALUES (?,?,?,?,?,?)",
                        b.quarantine,
                    )
                if b.settles:
                    c.executemany(
                        "UPDATE deliveries SET state = ?, attempts = attempts + 1, "
                        "last_error = ?, updated = ? WHERE sink = ? AND seq = ?",
                        [(s.state, s.error, s.at, s.sink, s.seq) for s in b.settles],
                    )
                c.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self.measure()
        except sqlite3.Error as exc:
            raise self._error("commit", exc) from exc
        return all_new

    def _rollback(self) -> None:
        """Roll back what is left of a failed transaction, never masking why it failed
        (after SQLITE_FULL, SQLite has usually rolled back already)."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _error(self, what: str, exc: sqlite3.Error) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_FULL" or (name in _FULL_IOERRS and self.free_bytes() < _LOW_FREE_BYTES):
            self.release_reserve()
            return OutboxFull(
                f"disk full or outbox at its size limit: cannot write {self.path} "
                f"({self.free_bytes() / 2**20:.1f} MB free on its filesystem; SQLite: {exc})"
            )
        return StoreError(f"outbox {what} failed: {exc}")

    def free_bytes(self) -> int:
        """Free space on the outbox's filesystem now (one statvfs)."""
        try:
            return shutil.disk_usage(self.path.parent).free
        except OSError:
            return 0

    def make_reserve(self, size: int) -> bool:
        """Hold ``size`` bytes of the filesystem in ``<outbox>-reserve`` (allocated, not
        written), unless held already or the room is not there. Released when a write finds
        the disk full (the outbox filled it past its free-space floor, or another program
        did): marking deliveries done, pruning and checkpoints then have room, so the
        outbox can give space back. At most RESERVE_FILE_MAX_BYTES. Returns whether it is
        held."""
        size = min(size, RESERVE_FILE_MAX_BYTES)
        self.reserve_bytes = size
        if size <= 0:  # none wanted: one left by an earlier run is given back
            self.reserve_path.unlink(missing_ok=True)
            self.reserve_held = False
            return False
        if self.reserve_held:
            return True
        try:  # a file left by an earlier run is kept and completed (a partial one, too)
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                if os.fstat(fd).st_size > size:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("no reserve file %s (%s): a full disk may then need an "
                            "operator to free space", self.reserve_path, exc)
                self.reserve_bytes = 0
            return False
        self.reserve_held = True
        return True

    def free_for_ingest(self) -> int:
        """Free space on the filesystem, less what the reserve file would hold were it
        there (it is made again before ingest takes that space) and what the WAL may grow
        back to after a checkpoint truncated it (else each truncation would look like room
        come back): one statvfs."""
        free = self.free_bytes() - max(0, self.wal_limit_bytes - self.wal_bytes)
        return free if self.reserve_held else free - self.reserve_bytes

    def release_reserve(self) -> None:
        """Give the reserve file's space back to the filesystem (for the outbox's writes)."""
        if not self.reserve_bytes:
            return
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot release %s: %s", self.reserve_path, exc)
            return
        if self.reserve_held:
            log.warning("disk full: released the %.1f MB held in %s for the outbox's own "
                        "writes (marking deliveries done, pruning)",
                        self.reserve_bytes / 2**20, self.reserve_path)
        self.reserve_held = False

    def disk_total_bytes(self) -> int:
        """The size of the outbox's filesystem (0: unknown)."""
        try:
            return shutil.disk_usage(self.path.parent).total
        except OSError:
            return 0

    def fetch_pending(self, sink: str, after_seq: int, limit: int) -> list[Pending]:
        rows = self.conn.execute(
            "SELECT d.seq, e.id, e.type, e.subject, e.body, d.attempts FROM deliveries d "
            "JOIN events e ON e.seq = d.seq WHERE d.sink = ? AND d.state = 0 AND d.seq > ? "
            "ORDER BY d.seq LIMIT ?",
            (sink, after_seq, limit),
        ).fetchall()
        return [Pending(*r) for r in rows]

    def load_rule_state(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for rule, key, value in self.conn.execute("SELECT rule, key, value FROM rule_state"):
            out.setdefault(rule, {})[key] = value
        return out

    def load_inputs(self, since: float) -> Iterator[tuple[str, float]]:
        """The ids consumed since ``since``, in ``seen`` order, as a stream (at start only)."""
        return self.conn.execute(
            "SELECT msg_id, seen FROM inputs WHERE seen >= ? ORDER BY seen", (since,)
        )

    def input_seen(self, msg_id: str, since: float) -> bool:
        """Was ``msg_id`` consumed (durably) at or after ``since``?

        Called on the event loop, so on a connection of its own: a read in WAL mode waits
        for no writer (a commit in flight on the database thread). A point look-up.
        """
        r = self._reader
        if r is None:
            try:
                r = self._reader = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open outbox {self.path} to read: {exc}") from exc
        try:
            return bool(
                r.execute(
                    "SELECT 1 FROM inputs WHERE msg_id = ? AND seen >= ?", (msg_id, since)
                ).fetchall()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"outbox read failed: {exc}") from exc

    def prune_step(self, *, inputs_before: float, delivered_before: float) -> int:
        """Forget, in one short transaction, up to ``PRUNE_CHUNK`` input ids seen before
        ``inputs_before`` and events created before ``delivered_before`` that every sink
        has delivered (dead-lettered ones stay for an operator), fewer when the disk is
        nearly full. Returns rows removed; call
        again until 0 (on the database thread: commits go on between the steps)."""
        c = self.conn
        limit = PRUNE_CHUNK
        room = self.free_bytes() + self.wal_bytes
        if room < PRUNE_TIGHT_BYTES:
            # On a nearly full disk, chunks small enough for the WAL to take them in the
            # room there is (the WAL, once checkpointed, is written over: it counts as
            # room, once checkpointed: done first, else this step would be appended to
            # it); deleting a row rewrites its page, so a row costs about its share of
            # the outbox (events are numbered densely: max - min is about their count).
            c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.measure()
            room = self.free_bytes() + self.wal_bytes
            pages_bytes = self.used_bytes - self.wal_bytes
            lo, hi = c.execute("SELECT min(seq), max(seq) FROM events").fetchone()
            per_row = max(PRUNE_WAL_PER_ROW, pages_bytes // (hi - lo + 1 if lo else 1))
            limit = max(16, min(PRUNE_CHUNK, room // 4 // per_row))
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                n = c.execute(
                    "DELETE FROM inputs WHERE msg_id IN (SELECT msg_id FROM inputs "
                    "WHERE seen < ? ORDER BY seen LIMIT ?)",
                    (inputs_before, limit),
                ).rowcount
                k, upto = self._prune_events(delivered_before, limit)
                c.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise self._error("prune", exc) from exc
        self._prune_from = upto  # only once that is durable (a full disk rolls it back)
        return n + k

    def _prune_events(self, before: float, limit: int) -> tuple[int, int]:
        """Delete a chunk of delivered events; returns (rows, the next ``_prune_from``)."""
        c = self.conn
        # Sinks deliver in seq order: below the first seq still pending anywhere, every
        # delivery is settled (delivered or dead).
        low = min(
            [c.execute("SELECT coalesce(min(seq), 1 << 62) FROM deliveries WHERE sink = ? "
                       "AND state = 0", (sink,)).fetchone()[0]
             for (sink,) in c.execute("SELECT DISTINCT sink FROM deliveries").fetchall()]
            or [1 << 62]
        )
        lo = self._prune_from
        hi = None
        for seq, created in c.execute(
            "SELECT seq, created FROM events WHERE seq >= ? AND seq < ? ORDER BY seq LIMIT ?",
            (lo, low, limit),
        ).fetchall():
            if created >= before:  # events are created in seq order: the rest are newer
                break
            hi = seq
        if hi is None:
            return 0, lo
        c.execute(
            "DELETE FROM deliveries WHERE seq BETWEEN ?1 AND ?2 AND seq NOT IN "
            "(SELECT seq FROM deliveries WHERE seq BETWEEN ?1 AND ?2 AND state != 1)",
            (lo, hi),
        )
        n = c.execute(
            "DELETE FROM events WHERE seq BETWEEN ?1 AND ?2 AND seq NOT IN "
            "(SELECT seq FROM deliveries WHERE seq BETWEEN ?1 AND ?2)",
            (lo, hi),
        ).rowcount
        return max(n, 1), hi + 1  # a chunk of dead letters only is progress too

    def prune(self, *, inputs_before: float, delivered_before: float) -> int:
        """Every ``prune_step`` at once (the CLI, tests). Returns rows removed."""
        n = 0
        while k := self.prune_step(inputs_before=inputs_before, delivered_before=delivered_before):
            n += k
        return n

    def compact(self) -> None:
        """Give freed pages back to the filesystem and checkpoint the WAL, truncating it.

        Works on a nearly full disk too: each vacuum step moves no more pages than a
        quarter of the free space can take in the WAL, and is checkpointed before the next
        (the file shrinks at the checkpoint and the WAL is written over from its start)."""
        c = self.conn
        try:
            while c.execute("PRAGMA freelist_count").fetchone()[0] > 0:
                step = max(8, min(VACUUM_CHUNK_PAGES, self.free_bytes() // self.page_size // 4))
                c.execute(f"PRAGMA incremental_vacuum({step})").fetchall()
                c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self.measure()
        except sqlite3.Error as exc:
            raise self._error("compact", exc) from exc

    def size_bytes(self) -> int:
        """The database file and its WAL as they are on disk now."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(str(self.path) + suffix)
            except OSError:
                pass
        return total

    # --- operators (CLI) -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        per_sink: dict[str, dict[str, int]] = {}
        for sink, state, n in self.conn.execute(
            "SELECT sink, state, count(*) FROM deliveries GROUP BY sink, state"
        ):
            per_sink.setdefault(sink, {"pending": 0, "delivered": 0, "dead": 0})[
                STATE_NAMES[state]
            ] = n
        by_type = dict(self.conn.execute("SELECT type, count(*) FROM events GROUP BY type"))
        q = dict(self.conn.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason"))
        return {
            "events": sum(by_type.values()),
            "events_by_type": by_type,
            "sinks": per_sink,
            "open_rule_keys": self.conn.execute("SELECT count(*) FROM rule_state").fetchone()[0],
            "quarantine": q,
            "size_bytes": self.size_bytes(),
        }

    def list_events(
        self, *, sink: str | None = None, state: int | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        sql = (
            "SELECT e.seq, e.id, e.type, e.subject, e.time, d.sink, d.state, d.attempts, "
            "d.last_error, d.updated FROM events e JOIN deliveries d ON d.seq = e.seq"
        )
        where, args = [], []
        if sink is not None:
            where.append("d.sink = ?")
            args.append(sink)
        if state is not None:
            where.append("d.state = ?")
            args.append(state)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY e.seq DESC LIMIT ?"
        args.append(limit)
        cols = ["seq", "id", "type", "subject", "time", "sink", "state", "attempts", "last_error", "updated"]
        out = []
        for row in self.conn.execute(sql, args):
            d = dict(zip(cols, row, strict=True))
            d["state"] = STATE_NAMES[d["state"]]
            out.append(d)
        return out

    def retry_dead(self, *, sink: str | None = None, ids: Iterable[str] = ()) -> int:
        """Put dead deliveries back to pending (all of a sink, or the given event ids)."""
        ids = list(ids)
        sql = "UPDATE deliveries SET state = 0, updated = ? WHERE state = 2"
        args: list[Any] = [time.time()]
        if sink is not None:
            sql += " AND sink = ?"
            args.append(sink)
        if ids:
            sql += f" AND seq IN (SELECT seq FROM events WHERE id IN ({','.join('?' * len(ids))}))"
            args += ids
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            n = self.conn.execute(sql, args).rowcount
        self._prune_from = 0  # those events are owed again: look at them when delivered
        return n

    def quarantined(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(
            self.db.query(
                "SELECT id, device, source, reason, detail, length(payload) AS bytes, received "
                "FROM quarantine ORDER BY id DESC LIMIT ?",
                [limit],
            )
        )
