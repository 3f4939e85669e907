-- 0002_webhooks (SQLite): the same tables as postgresql/0002_webhooks.sql.
-- ``events`` is a JSON array of strings (text[] on PostgreSQL); UUIDs and timestamps are
-- stored as in 0001_initial. Lengths are CHECKed so that SQLite refuses what PostgreSQL
-- refuses.

CREATE TABLE webhooks (
    id                TEXT PRIMARY KEY NOT NULL,
    url               TEXT NOT NULL CHECK (length(url) <= 2048),
    events            TEXT NOT NULL CHECK (json_valid(events) AND json_array_length(events) >= 1),
    description       TEXT NULL CHECK (description IS NULL OR length(description) <= 255),
    secret_ciphertext TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);

CREATE TABLE webhook_deliveries (
    id               TEXT    PRIMARY KEY NOT NULL,
    webhook_id       TEXT    NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event            TEXT    NOT NULL CHECK (length(event) <= 128),
    event_id         TEXT    NOT NULL CHECK (length(event_id) <= 128),
    payload          TEXT    NOT NULL,
    status           TEXT    NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  TEXT    NULL,
    last_status_code INTEGER NULL,
    last_error       TEXT    NULL,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL,
    CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
);

CREATE UNIQUE INDEX idx_webhook_deliveries_event ON webhook_deliveries (webhook_id, event_id);
CREATE INDEX idx_webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX idx_webhook_deliveries_log ON webhook_deliveries (webhook_id, created_at DESC);
CREATE INDEX idx_webhook_deliveries_finished ON webhook_deliveries (updated_at)
    WHERE status <> 'pending';
