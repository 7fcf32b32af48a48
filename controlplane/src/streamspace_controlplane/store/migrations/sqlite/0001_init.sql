-- StreamSpace control plane schema, version 1 (SQLite).
-- Column names are the fields of streamspace_controlplane.models; table names follow the
-- seed deployment guide (agents, agent_commands, sessions). Times are ISO-8601 TEXT in UTC
-- with microseconds, so they compare and sort as text; structured values are JSON TEXT;
-- booleans are 0/1. Keep it in step with ../postgres/0001_init.sql.

CREATE TABLE users (
    username        TEXT PRIMARY KEY,
    role            TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user')),
    password_hash   TEXT NOT NULL,
    created_at      TEXT NOT NULL
);

CREATE TABLE agent_tokens (
    token_id        TEXT PRIMARY KEY,
    agent_id        TEXT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL,
    revoked_at      TEXT,
    last_used_at    TEXT
);
CREATE INDEX idx_agent_tokens_agent_id ON agent_tokens (agent_id, created_at);

CREATE TABLE agents (
    agent_id            TEXT PRIMARY KEY,
    platform            TEXT NOT NULL,
    region              TEXT NOT NULL DEFAULT 'default',
    labels              TEXT NOT NULL DEFAULT '{}',
    status              TEXT NOT NULL DEFAULT 'offline' CHECK (status IN ('online', 'offline')),
    capacity            TEXT NOT NULL DEFAULT '{"max_sessions": 0}',
    usage               TEXT NOT NULL DEFAULT '{}',
    metadata            TEXT NOT NULL DEFAULT '{}',
    websocket_conn_id   TEXT,
    last_heartbeat      TEXT,
    fencing_epoch       INTEGER NOT NULL DEFAULT 0 CHECK (fencing_epoch >= 0),
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX idx_agents_platform ON agents (platform);
CREATE INDEX idx_agents_status ON agents (status);
CREATE INDEX idx_agents_last_heartbeat ON agents (last_heartbeat);

CREATE TABLE templates (
    name                TEXT PRIMARY KEY,
    display_name        TEXT NOT NULL DEFAULT '',
    description         TEXT NOT NULL DEFAULT '',
    image               TEXT,
    command             TEXT NOT NULL DEFAULT '[]',
    vnc_port            INTEGER NOT NULL DEFAULT 5900,
    resources           TEXT NOT NULL DEFAULT '{}',
    env                 TEXT NOT NULL DEFAULT '{}',
    persistent_home     INTEGER NOT NULL DEFAULT 0 CHECK (persistent_home IN (0, 1)),
    platform            TEXT,
    region              TEXT,
    labels              TEXT NOT NULL DEFAULT '{}',
    platform_options    TEXT NOT NULL DEFAULT '{}',
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);

CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    "user"              TEXT NOT NULL,
    template            TEXT NOT NULL,
    template_snapshot   TEXT NOT NULL,
    desired_state       TEXT NOT NULL DEFAULT 'running'
                        CHECK (desired_state IN ('running', 'hibernated', 'stopped')),
    state               TEXT NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'scheduled', 'starting', 'running', 'stopping',
                                         'stopped', 'hibernated', 'failed', 'lost')),
    generation          INTEGER NOT NULL DEFAULT 1 CHECK (generation >= 1),
    agent_id            TEXT,
    platform            TEXT,
    platform_metadata   TEXT NOT NULL DEFAULT '{}',
    reason              TEXT NOT NULL DEFAULT '',
    labels              TEXT NOT NULL DEFAULT '{}',
    region              TEXT,
    forget              INTEGER NOT NULL DEFAULT 0 CHECK (forget IN (0, 1)),
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX idx_sessions_user_state ON sessions ("user", state);
CREATE INDEX idx_sessions_state ON sessions (state);
CREATE INDEX idx_sessions_agent_id_state ON sessions (agent_id, state);
CREATE INDEX idx_sessions_platform ON sessions (platform);
CREATE INDEX idx_sessions_created_at ON sessions (created_at, id);

-- The outbox: one row per command, idempotent on (session_id, generation, command_type).
CREATE TABLE agent_commands (
    command_id          TEXT PRIMARY KEY,
    agent_id            TEXT NOT NULL,
    session_id          TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    generation          INTEGER NOT NULL CHECK (generation >= 1),
    command_type        TEXT NOT NULL,
    command_data        TEXT NOT NULL DEFAULT '{}',
    status              TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'sent', 'acked', 'completed', 'failed',
                                          'expired')),
    result              TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at          TEXT NOT NULL,
    sent_at             TEXT,
    acked_at            TEXT,
    completed_at        TEXT,
    next_attempt_at     TEXT,
    CONSTRAINT uq_agent_commands_session_generation_type
        UNIQUE (session_id, generation, command_type)
);
CREATE INDEX idx_agent_commands_due ON agent_commands (agent_id, status, next_attempt_at);
CREATE INDEX idx_agent_commands_status_created ON agent_commands (status, created_at);

-- AUTOINCREMENT: ids are never reused after a delete, since clients resume by id (SSE).
CREATE TABLE session_events (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id          TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    state               TEXT NOT NULL,
    previous_state      TEXT,
    detail              TEXT NOT NULL DEFAULT '',
    at                  TEXT NOT NULL
);
CREATE INDEX idx_session_events_session_id ON session_events (session_id, id);

CREATE TABLE audit_log (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    actor               TEXT NOT NULL,
    action              TEXT NOT NULL,
    resource            TEXT NOT NULL,
    detail              TEXT NOT NULL DEFAULT '{}',
    at                  TEXT NOT NULL
);
CREATE INDEX idx_audit_log_at ON audit_log (at);
