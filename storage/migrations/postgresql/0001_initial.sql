-- 0001_initial (PostgreSQL): users, refresh-token families, e-mail verification tokens.
-- Runs inside the migration transaction, with the search_path set to the target schema.

CREATE TABLE users (
    id            uuid         PRIMARY KEY,
    email         varchar(255) NOT NULL,
    password_hash varchar(255) NOT NULL,
    full_name     varchar(255) NOT NULL,
    avatar_url    varchar(512) NULL,
    is_verified   boolean      NOT NULL DEFAULT false,
    is_active     boolean      NOT NULL DEFAULT true,
    role          text         NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    created_at    timestamptz  NOT NULL,
    updated_at    timestamptz  NOT NULL,
    deleted_at    timestamptz  NULL
);

-- One live account per e-mail, whatever its case; a soft-deleted one frees the address.
CREATE UNIQUE INDEX idx_users_email ON users (lower(email)) WHERE deleted_at IS NULL;
CREATE INDEX idx_users_created_at ON users (created_at);
CREATE INDEX idx_users_is_active ON users (is_active) WHERE is_active = true;

-- A refresh-token family: id is the "sid" claim; token_hash is SHA-256(jti) of the current token.
CREATE TABLE refresh_sessions (
    id             uuid        PRIMARY KEY,
    user_id        uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash     text        NOT NULL,
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    rotated_at     timestamptz NULL,
    revoked_at     timestamptz NULL,
    revoked_reason text        NULL,
    ip_address     text        NULL,
    user_agent     text        NULL
);

CREATE INDEX idx_refresh_sessions_user_id ON refresh_sessions (user_id);
CREATE INDEX idx_refresh_sessions_revoked_at ON refresh_sessions (revoked_at);

CREATE TABLE email_verifications (
    token_hash text        PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz NULL
);

CREATE INDEX idx_email_verifications_user_id ON email_verifications (user_id);
