"""Versioned schema migrations, applied at start-up in order, each exactly once.

Each migration is a list of statements; `{serial}` and `{real}` are filled per dialect.
Never edit a released migration: add a new one.
"""

from __future__ import annotations

_TYPES = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"},
    "postgresql": {"serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"},
}

_V1 = [
    """CREATE TABLE accounts (
        fingerprint TEXT PRIMARY KEY,
        balance INTEGER NOT NULL CHECK (balance >= 0),
        last_check_in TEXT,
        created_at {real} NOT NULL,
        updated_at {real} NOT NULL
    )""",
    """CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        mode TEXT NOT NULL,
        prompt TEXT NOT NULL,
        size TEXT NOT NULL,
        state TEXT NOT NULL,
        refunded INTEGER NOT NULL DEFAULT 0,
        image_url TEXT,
        revised_prompt TEXT,
        error TEXT,
        reference_path TEXT,
        reference_name TEXT,
        reference_type TEXT,
        upstream_created_at TEXT,
        upstream_updated_at TEXT,
        created_at {real} NOT NULL,
        updated_at {real} NOT NULL
    )""",
    "CREATE INDEX tasks_unfinished ON tasks (created_at)"
    " WHERE state IN ('submitting', 'queued', 'running')",
    """CREATE TABLE journal (
        id {serial},
        fingerprint TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('grant', 'charge', 'refund')),
        amount INTEGER NOT NULL CHECK (amount > 0),
        task_id TEXT,
        created_at {real} NOT NULL
    )""",
    "CREATE INDEX journal_fingerprint ON journal (fingerprint)",
    # the last line of defence for "exactly once"
    "CREATE UNIQUE INDEX journal_one_charge ON journal (task_id) WHERE kind = 'charge'",
    "CREATE UNIQUE INDEX journal_one_refund ON journal (task_id) WHERE kind = 'refund'",
]

_APPEND_ONLY = {
    "sqlite": [
        "CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal"
        " BEGIN SELECT RAISE(ABORT, 'journal is append-only'); END",
        "CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal"
        " BEGIN SELECT RAISE(ABORT, 'journal is append-only'); END",
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION journal_append_only() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'journal is append-only'; END $$",
        "CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal"
        " FOR EACH STATEMENT EXECUTE FUNCTION journal_append_only()",
    ],
}


# the settlement core: a version every change bumps, a lease (owner, until), whether the
# answer reached the client, idempotency keys, and our own code for why a task failed
_V3 = [
    "ALTER TABLE tasks ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN lease_owner TEXT",
    "ALTER TABLE tasks ADD COLUMN lease_until {real} NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN handed_at {real}",
    "ALTER TABLE tasks ADD COLUMN idempotency_key TEXT",
    "ALTER TABLE tasks ADD COLUMN request_hash TEXT",
    "ALTER TABLE tasks ADD COLUMN error_code TEXT",
    # before this version every submission was answered (as "queued" when its outcome was
    # unknown): its answer was handed
    "UPDATE tasks SET handed_at = created_at",
    "CREATE UNIQUE INDEX tasks_idempotency ON tasks (fingerprint, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX tasks_keyed ON tasks (created_at) WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX tasks_references ON tasks (id) WHERE reference_path IS NOT NULL",
]


# readiness: one row that a probe rewrites, to know the database accepts a write
_V4 = [
    "CREATE TABLE health (id INTEGER PRIMARY KEY, checked_at {real} NOT NULL)",
    "INSERT INTO health (id, checked_at) VALUES (1, 0)",
]


# the image store: a completed task's image is ours (content-hash key, type, size,
# dimensions), copied while the task is `fetching`; retention marks and purges; named leases
# for work one instance at a time does (the retention sweep)
_V5 = [
    "ALTER TABLE tasks ADD COLUMN image_key TEXT",
    "ALTER TABLE tasks ADD COLUMN image_type TEXT",
    "ALTER TABLE tasks ADD COLUMN image_bytes INTEGER",
    "ALTER TABLE tasks ADD COLUMN image_width INTEGER",
    "ALTER TABLE tasks ADD COLUMN image_height INTEGER",
    "ALTER TABLE tasks ADD COLUMN image_stored_at {real}",
    "ALTER TABLE tasks ADD COLUMN image_expired_at {real}",
    "ALTER TABLE tasks ADD COLUMN image_purged INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN upstream_done_at {real}",
    "ALTER TABLE tasks ADD COLUMN fetch_attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE tasks ADD COLUMN fetch_error TEXT",
    "DROP INDEX tasks_unfinished",
    "CREATE INDEX tasks_unfinished ON tasks (created_at)"
    " WHERE state IN ('submitting', 'queued', 'running', 'fetching')",
    "CREATE INDEX tasks_fetching ON tasks (lease_until) WHERE state = 'fetching'",
    "CREATE INDEX tasks_image_key ON tasks (image_key) WHERE image_key IS NOT NULL",
    "CREATE INDEX tasks_images_live ON tasks (image_stored_at)"
    " WHERE image_key IS NOT NULL AND image_expired_at IS NULL",
    "CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT, lease_until {real} NOT NULL)",
    "INSERT INTO leases (name, owner, lease_until) VALUES ('sweep', NULL, 0)",
]


# synchronous upstreams (the OpenAI Images API): a task is a job of ours, sent at most once
_V6 = [
    "ALTER TABLE tasks ADD COLUMN kind TEXT NOT NULL DEFAULT 'task'",
    "ALTER TABLE tasks ADD COLUMN sent_at {real}",
    "CREATE INDEX tasks_jobs ON tasks (created_at) WHERE kind = 'sync' AND state = 'queued'",
]


# several upstreams: a row names the upstream that holds it (rows made before: `default`) and
# the ones it left, and why (JSON); the non-secret description of every upstream configured,
# so that one removed from the file while it holds tasks can still be asked about them
_V7 = [
    "ALTER TABLE tasks ADD COLUMN upstream TEXT NOT NULL DEFAULT 'default'",
    "ALTER TABLE tasks ADD COLUMN attempts TEXT",
    "DROP INDEX tasks_jobs",
    "CREATE INDEX tasks_jobs ON tasks (upstream, created_at)"
    " WHERE kind = 'sync' AND state = 'queued'",
    "CREATE INDEX tasks_finished_at ON tasks (upstream, updated_at)"
    " WHERE state IN ('completed', 'failed')",
    "CREATE TABLE upstreams (name TEXT PRIMARY KEY, description TEXT NOT NULL,"
    " seen_at {real} NOT NULL)",
]


# task events across instances (PostgreSQL): every change of a task's answer (every settlement
# write bumps updated_at; claims and lease renewals do not) is notified, with the task's id
_V8 = {
    "sqlite": [],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION scenemint_task_changed() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN PERFORM pg_notify('scenemint_task', NEW.id); RETURN NULL; END $$",
        "CREATE TRIGGER tasks_changed AFTER UPDATE ON tasks FOR EACH ROW"
        " WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at)"
        " EXECUTE FUNCTION scenemint_task_changed()",
    ],
}


def migrations_for(dialect: str) -> list[tuple[int, list[str]]]:
    types = _TYPES[dialect]
    return [
        (1, [statement.format(**types) for statement in _V1]),
        (2, list(_APPEND_ONLY[dialect])),
        (3, [statement.format(**types) for statement in _V3]),
        (4, [statement.format(**types) for statement in _V4]),
        (5, [statement.format(**types) for statement in _V5]),
        (6, [statement.format(**types) for statement in _V6]),
        (7, [statement.format(**types) for statement in _V7]),
        (8, list(_V8[dialect])),
    ]
