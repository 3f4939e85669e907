-- 0001_initial (SQLite): the same tables as postgresql/0001_initial.sql.
-- UUIDs are lower-case text; timestamps are ISO-8601 UTC text with microseconds
-- ("2025-01-02T03:04:05.000006+00:00"), so text order is time order. Lengths and
-- booleans are CHECKed so that SQLite refuses what PostgreSQL refuses.

CREATE TABLE users (
    id            TEXT    PRIMARY KEY NOT NULL,
    email         TEXT    NOT NULL CHECK (length(email) <= 255),
    password_hash TEXT    NOT NULL CHECK (length(password_hash) <= 255),
    full_name     TEXT    NOT NULL CHECK (length(full_name) <= 255),
    avatar_url    TEXT    NULL CHECK (avatar_url IS NULL OR length(avatar_url) <= 512),
    is_verified   INTEGER NOT NULL DEFAULT 0 CHECK (is_verified IN (0, 1)),
    is_active     INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    role          TEXT    NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL,
    deleted_at    TEXT    NULL
);

-- One live account per e-mail, whatever its case; a soft-deleted one frees the address.
CREATE UNIQUE INDEX idx_users_email ON users (lower(email)) WHERE deleted_at IS NULL;
CREATE INDEX idx_users_created_at ON users (created_at);
CREATE INDEX idx_users_is_active ON users (is_active) WHERE is_active = 1;

CREATE TABLE refresh_sessions (
    id             TEXT PRIMARY KEY NOT NULL,
    user_id        TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash     TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    expires_at     TEXT NOT NULL,
    rotated_at     TEXT NULL,
    revoked_at     TEXT NULL,
    revoked_reason TEXT NULL,
    ip_address     TEXT NULL,
    user_agent     TEXT NULL
);

CREATE INDEX idx_refresh_sessions_user_id ON refresh_sessions (user_id);
CREATE INDEX idx_refresh_sessions_revoked_at ON refresh_sessions (revoked_at);

CREATE TABLE email_verifications (
    token_hash TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at TEXT NOT NULL,
    used_at    TEXT NULL
);

CREATE INDEX idx_email_verifications_user_id ON email_verifications (user_id);
