-- 0002_webhooks (PostgreSQL): webhook endpoints and their durable delivery log (SPEC §5).
-- Runs inside the migration transaction, with the search_path set to the target schema.

-- An endpoint. ``secret_ciphertext`` is the signing secret sealed with AES-256-GCM
-- (bridge/secretbox.py, the row id as associated data); the plain secret is never stored.
-- ``events`` lists event names; '*' subscribes to every event.
CREATE TABLE webhooks (
    id                uuid          PRIMARY KEY,
    url               varchar(2048) NOT NULL,
    events            text[]        NOT NULL CHECK (cardinality(events) >= 1),
    description       varchar(255)  NULL,
    secret_ciphertext text          NOT NULL,
    created_at        timestamptz   NOT NULL,
    updated_at        timestamptz   NOT NULL
);

CREATE INDEX idx_webhooks_events ON webhooks USING gin (events);

-- One event for one endpoint. ``payload`` is the exact request body that is signed and
-- sent on every attempt. While a node is sending it, ``next_attempt_at`` is the end of
-- that node's lease; once it succeeded or failed for good it is NULL.
CREATE TABLE webhook_deliveries (
    id               uuid         PRIMARY KEY,
    webhook_id       uuid         NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event            varchar(128) NOT NULL,
    event_id         varchar(128) NOT NULL,
    payload          text         NOT NULL,
    status           text         NOT NULL DEFAULT 'pending'
                                  CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         integer      NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz  NULL,
    last_status_code integer      NULL,
    last_error       text         NULL,
    created_at       timestamptz  NOT NULL,
    updated_at       timestamptz  NOT NULL,
    CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
);

-- The same event (a redelivered RabbitMQ message, a retried POST) is queued once per endpoint.
CREATE UNIQUE INDEX idx_webhook_deliveries_event ON webhook_deliveries (webhook_id, event_id);
-- What the dispatcher claims: due pending deliveries, oldest first.
CREATE INDEX idx_webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
-- The admin log of one endpoint, newest first.
CREATE INDEX idx_webhook_deliveries_log ON webhook_deliveries (webhook_id, created_at DESC);
-- Pruning of finished deliveries.
CREATE INDEX idx_webhook_deliveries_finished ON webhook_deliveries (updated_at)
    WHERE status <> 'pending';
