"""Every served job's record, input and video in one SQLite file in the output folder: a restart loses nothing.

A job is written (committed, fsynced) before its 202 is answered. A worker *claims* it (queued ->
running, atomically, under a lease it renews while it works) and *finishes* it with the lease it holds,
so two deliveries of one job never run it twice and a worker whose lease lapsed cannot overwrite a
newer attempt. A running job whose lease lapses (its worker or the whole server died) is put back in
the queue once; a job that loses its worker a second time fails (it may be what kills the worker).
Videos are files next to the database, written before the record that names them. Plain Python.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

DB_NAME = "jobs.sqlite3"
MAX_REQUEUES = 1
FINAL = ("done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    workload TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    image BLOB,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    requeues INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    gpu TEXT,
    error TEXT,
    report TEXT,
    video TEXT,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, submitted);
"""


class JobStore:
    """The SQLite job table of one output folder. One writer at a time (the job board actor)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # the inputs are the clients': not world-readable
        os.close(fd)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # committed means on disk: the 202 comes after
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- the front -------------------------------------------------------------------------------

    def create(self, job_id: str, workload: str, request: dict[str, Any], image: bytes | None = None) -> dict:
        """Store a new queued job (idempotent for one id: a retried call finds the first)."""
        self.db.execute("INSERT OR IGNORE INTO jobs (id, workload, status, request, image, submitted) "
                        "VALUES (?, ?, 'queued', ?, ?, ?)",
                        (job_id, workload, json.dumps(request), image, time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        """The public record of a job (no input image, no lease)."""
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _public(row)

    def queued(self) -> list[tuple[str, str]]:
        """(id, workload) of every queued job, oldest first."""
        return [(r["id"], r["workload"]) for r in
                self.db.execute("SELECT id, workload FROM jobs WHERE status = 'queued' ORDER BY submitted, id")]

    def fail_queued(self, job_id: str, error: str) -> bool:
        """A queued job nothing can run (its workload lost every deployment)."""
        cur = self.db.execute("UPDATE jobs SET status = 'failed', error = ?, finished = ? "
                              "WHERE id = ? AND status = 'queued'", (error, time.time(), job_id))
        return cur.rowcount == 1

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Running jobs whose lease lapsed: back in the queue once, failed the second time. Returns the
        requeued (id, workload)."""
        now = time.time() if now is None else now
        lapsed = self.db.execute("SELECT id, workload, requeues FROM jobs WHERE status = 'running' AND lease_until < ?",
                                 (now,)).fetchall()
        back = []
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for row in lapsed:
                if row["requeues"] < MAX_REQUEUES:
                    self.db.execute("UPDATE jobs SET status = 'queued', requeues = requeues + 1, lease_owner = NULL, "
                                    "lease_until = NULL, step = 0 WHERE id = ? AND status = 'running'", (row["id"],))
                    back.append((row["id"], row["workload"]))
                else:
                    self.db.execute("UPDATE jobs SET status = 'failed', lease_owner = NULL, lease_until = NULL, "
                                    "finished = ?, error = ? WHERE id = ? AND status = 'running'",
                                    (now, f"its worker was lost {row['requeues'] + 1} times (the job was re-queued "
                                          f"{row['requeues']} time(s)); it may be what stops the worker", row["id"]))
        return back

    # -- the workers -----------------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_s: float, gpu: str | None = None) -> dict | None:
        """queued -> running under ``owner``'s lease; returns the job with its input, or None when it is
        not queued (someone else runs or ran it). A repeated claim by the same owner returns it again."""
        now = time.time()
        cur = self.db.execute("UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = ?, "
                              "lease_until = ?, started = ?, gpu = ?, step = 0 WHERE id = ? AND status = 'queued'",
                              (owner, now + lease_s, now, gpu, job_id))
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (cur.rowcount == 0 and not (row["status"] == "running" and row["lease_owner"] == owner)):
            return None
        return {"id": row["id"], "workload": row["workload"], "attempt": row["attempts"],
                **json.loads(row["request"]), "image_bytes": row["image"]}

    def heartbeat(self, job_id: str, owner: str, lease_s: float, step: int | None = None,
                  steps: int | None = None) -> bool:
        """Renew the lease (and record progress); False when the lease is no longer this owner's."""
        cur = self.db.execute("UPDATE jobs SET lease_until = ?, step = COALESCE(?, step), steps = COALESCE(?, steps) "
                              "WHERE id = ? AND status = 'running' AND lease_owner = ?",
                              (time.time() + lease_s, step, steps, job_id, owner))
        return cur.rowcount == 1

    def finish(self, job_id: str, owner: str, status: str, *, error: str | None = None,
               report: dict | None = None, video: bytes | None = None, fmt: str = "gif",
               step: int | None = None, steps: int | None = None) -> bool:
        """Record a finished attempt (``done`` with its video and report, or ``failed``) if ``owner``
        still holds the lease. The video file is written (atomically) before the record names it."""
        if status not in FINAL:
            raise ValueError(f"status {status!r}")
        row = self.db.execute("SELECT status, lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["lease_owner"] != owner:
            return False
        if row["status"] != "running":
            return row["status"] in FINAL  # a repeated finish of the same attempt
        path = None
        if video is not None:
            path = self.dir / f"{job_id}.{fmt}"
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "wb") as f:
                f.write(video)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        cur = self.db.execute("UPDATE jobs SET status = ?, error = ?, report = ?, video = ?, finished = ?, "
                              "lease_until = NULL, step = COALESCE(?, step), steps = COALESCE(?, steps), image = NULL "
                              "WHERE id = ? AND status = 'running' AND lease_owner = ?",
                              (status, error, None if report is None else json.dumps(report),
                               None if path is None else str(path), time.time(), step, steps, job_id, owner))
        return cur.rowcount == 1

    def video(self, job_id: str) -> tuple[bytes, str] | None:
        """(bytes, format) of a done job's video."""
        row = self.db.execute("SELECT video FROM jobs WHERE id = ? AND status = 'done'", (job_id,)).fetchone()
        if row is None or not row["video"]:
            return None
        path = Path(row["video"])
        if path.parent != self.dir:  # only files this store wrote
            return None
        try:
            return path.read_bytes(), path.suffix.lstrip(".")
        except OSError:
            return None

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")}


def _public(row: sqlite3.Row) -> dict:
    request = json.loads(row["request"])
    record = {"id": row["id"], "workload": row["workload"], "status": row["status"], "step": row["step"],
              "steps": row["steps"], "attempts": row["attempts"], "requeues": row["requeues"],
              "submitted": row["submitted"], "started": row["started"], "finished": row["finished"],
              "request": request}
    for key in ("gpu", "error"):
        if row[key] is not None:
            record[key] = row[key]
    if row["report"] is not None:
        record["report"] = json.loads(row["report"])
    if row["video"]:
        record["video"] = f"/jobs/{row['id']}/video"
    return record
