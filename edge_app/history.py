"""The screening history: one row per screening in a local SQLite database.

Durability is the point: a row is committed, in one transaction, before its result is
shown (see `edge_app.screening`), so killing the app or pulling the plug at any moment loses
nothing that anyone saw, and never leaves a half-written row.

* WAL journal: a crash mid-write leaves the last committed state, readers (the History
  screen) never block the writer (the screening worker).
* synchronous=FULL: in WAL mode, NORMAL already survives a killed process, but a commit made
  just before a power cut can be rolled back; a kiosk or a Pi gets unplugged, and a result
  shown must stay recorded. FULL costs one fsync per screening (milliseconds, next to the
  inference), which is nothing at clinic rates.

Times are UTC ISO-8601 strings, so they sort and compare as text.

Every SQLite failure becomes a `HistoryError` whose code says what a clinic can do about it
(`_typed`). A history that fails SQLite's quick check at open is refused and left untouched:
screening without a record is worse than not screening; `beside` names a fresh file to go on with.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edge_app.errors import HistoryError

SCHEMA_VERSION = 2   # 2: the warning column (a version-1 file gains it at open)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS screenings (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    screened_at          TEXT NOT NULL,
    image_path           TEXT NOT NULL,
    image_sha256         TEXT,             -- NULL when the file could not be read at all
    label                TEXT,             -- NULL when the image could not be screened
    probabilities        TEXT,             -- JSON {label: probability}, calibrated
    abnormal_probability REAL,
    decision             TEXT,
    warning              TEXT,             -- why the decision is "unreliable": edge_app.decision's warnings
    threshold            REAL,
    model_sha256         TEXT NOT NULL,
    backend              TEXT NOT NULL,
    latency_ms           REAL,
    error_code           TEXT,             -- edge_app.errors code when it could not be screened
    error_message        TEXT,
    CHECK ((label IS NULL) != (error_code IS NULL))
);
CREATE INDEX IF NOT EXISTS screenings_at ON screenings (screened_at);
"""
SEARCHED = ("image_path", "image_sha256", "label", "decision", "warning", "error_code")   # by search(text)


@dataclass
class Screening:
    """One screening as stored: a result, or the error that prevented one."""

    screened_at: str
    image_path: str
    image_sha256: str | None
    model_sha256: str
    backend: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    abnormal_probability: float | None = None
    decision: str | None = None
    warning: str | None = None
    threshold: float | None = None
    latency_ms: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    id: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None


def now() -> str:
    """The current UTC time as stored (millisecond ISO-8601)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def file_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file's bytes, or None where it cannot be read (the error says why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


class History:
    """The database; safe to share between the UI thread and the screening worker."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            code = "history_read_only" if exc.errno in (errno.EACCES, errno.EROFS) else "history_unavailable"
            raise _failure(code, "create the history's folder", exc.strerror or str(exc), self.path) from exc
        self._conn = None
        with self._typed("open the screening history"):
            # autocommit mode: every transaction below is explicit, BEGIN ... COMMIT
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._conn.row_factory = sqlite3.Row
            check = self._conn.execute("PRAGMA quick_check").fetchone()[0]  # before anything writes
            if check != "ok":   # its first line names the database, the next the first fault
                raise _failure("history_corrupt", "open the screening history",
                               f"SQLite's integrity check: {' '.join(check.splitlines()[1:2]) or check}", self.path)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("BEGIN IMMEDIATE")      # a read-only file or folder fails here, at open
            for statement in filter(str.strip, _SCHEMA.split(";")):   # executescript would COMMIT
                self._conn.execute(statement)
            if "warning" not in {c["name"] for c in self._conn.execute("PRAGMA table_info(screenings)")}:
                self._conn.execute("ALTER TABLE screenings ADD COLUMN warning TEXT")   # a version-1 history
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _typed(self, action: str):
        """SQLite's errors as HistoryError (a failed transaction rolled back, and the connection
        of a history that could not be opened closed)."""
        try:
            yield
        except (sqlite3.Error, HistoryError) as exc:
            if self._conn is not None and self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):   # SQLite may have rolled back already
                    self._conn.execute("ROLLBACK")
            if action.startswith("open") and self._conn is not None:
                self._conn.close()
            if isinstance(exc, (HistoryError, sqlite3.IntegrityError)):   # the latter: a caller's bug
                raise
            raise _history_error(exc, action, self.path) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, screening: Screening) -> Screening:
        """Stores one screening in one transaction; returns it with its id. Durable on return."""
        row = asdict(screening)
        row.pop("id")
        if row["probabilities"] is not None:
            row["probabilities"] = json.dumps(row["probabilities"])
        columns = ", ".join(row)
        with self._lock, self._typed("record the screening in the history"):
            self._conn.execute("BEGIN IMMEDIATE")
            cursor = self._conn.execute(f"INSERT INTO screenings ({columns}) VALUES "
                                        f"({', '.join('?' * len(row))})", tuple(row.values()))
            self._conn.execute("COMMIT")
        screening.id = cursor.lastrowid
        return screening

    def search(self, text: str = "", *, label: str | None = None, since: str | None = None,
               until: str | None = None, limit: int | None = 500) -> list[Screening]:
        """Newest first. `text` matches path, hash, label, decision, warning or error code (substring);
        `since`/`until` are dates or times (ISO-8601, UTC), `until` inclusive of its whole day."""
        where, params = [], []
        if text:
            where.append("(" + " OR ".join(f"{c} LIKE ?" for c in SEARCHED) + ")")
            params += [f"%{text}%"] * len(SEARCHED)
        if label:
            where.append("label = ?")
            params.append(label)
        if since:
            where.append("screened_at >= ?")
            params.append(since)
        if until:
            where.append("screened_at < ?")
            params.append(_day_after(until) if len(until) == 10 else until)
        sql = "SELECT * FROM screenings" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        with self._lock, self._typed("search the history"):
            rows = self._conn.execute(sql, params).fetchall()
        return [_screening(r) for r in rows]

    def get(self, screening_id: int) -> Screening | None:
        with self._lock, self._typed("read the history"):
            row = self._conn.execute("SELECT * FROM screenings WHERE id = ?", (screening_id,)).fetchone()
        return None if row is None else _screening(row)

    def integrity(self) -> str:
        """SQLite's own check of the whole file: "ok" when intact."""
        with self._lock, self._typed("check the history"):
            return self._conn.execute("PRAGMA integrity_check").fetchone()[0]


def beside(path: str | os.PathLike) -> Path:
    """A new history file's name beside `path` (history-20261202-141500.sqlite3): where to go on
    when `path` cannot be used, which stays as it is."""
    path = Path(path)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = path.with_name(f"{path.stem}-{stamp}{path.suffix}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{stamp}-{n}{path.suffix}")
    return candidate


_ADVICE = {
    "history_corrupt": "it is damaged. It is left as it was: keep it for your IT support, and start a new history",
    "history_read_only": "it cannot be written (read-only file, folder or storage). Make it writable, "
                         "or start a new history in a writable place",
    "history_disk_full": "the storage is full. Free some space (export and move old files), then try again",
    "history_unavailable": "the file or its storage cannot be reached. Check the storage and the history path "
                           "in the settings",
}


def _history_error(exc: sqlite3.Error, action: str, path: Path) -> HistoryError:
    """The code of SQLite's (primary) result code; the message says what to do."""
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    code = {sqlite3.SQLITE_CORRUPT: "history_corrupt", sqlite3.SQLITE_NOTADB: "history_corrupt",
            sqlite3.SQLITE_READONLY: "history_read_only", sqlite3.SQLITE_PERM: "history_read_only",
            sqlite3.SQLITE_FULL: "history_disk_full"}.get(primary, "history_unavailable")
    if code == "history_unavailable" and primary == sqlite3.SQLITE_CANTOPEN and path.exists() \
            and not os.access(path.parent, os.W_OK):
        code = "history_read_only"
    return _failure(code, action, f"SQLite: {exc}", path)


def _failure(code: str, action: str, detail: str, path: Path) -> HistoryError:
    return HistoryError(code, f"Cannot {action}: {_ADVICE[code]}. ({detail[:120]})", path)


def export_csv(screenings: list[Screening], path: str | os.PathLike) -> Path:
    """The screenings as CSV, one probability column per label; written atomically."""
    path = Path(path)
    labels = list(dict.fromkeys(l for s in screenings for l in (s.probabilities or {})))
    names = [f.name for f in fields(Screening) if f.name != "probabilities"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names + [f"p_{l}" for l in labels])
        for s in screenings:
            probs = s.probabilities or {}
            writer.writerow([getattr(s, n) for n in names] + [probs.get(l, "") for l in labels])
    os.replace(tmp, path)
    return path


def _screening(row: sqlite3.Row) -> Screening:
    values = dict(row)
    if values["probabilities"] is not None:
        values["probabilities"] = json.loads(values["probabilities"])
    return Screening(**values)


def _day_after(day: str) -> str:
    return (datetime.date.fromisoformat(day) + datetime.timedelta(days=1)).isoformat()
