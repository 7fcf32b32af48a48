-- StreamSpace control plane schema, version 1 (PostgreSQL).
-- Column names are the fields of streamspace_controlplane.models; table names follow the
-- seed deployment guide (agents, agent_commands, sessions). Times are TIMESTAMPTZ (UTC),
-- structured values JSONB. Keep it in step with ../sqlite/0001_init.sql.

CREATE TABLE users (
    username        TEXT PRIMARY KEY,
    role            TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user')),
    password_hash   TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE agent_tokens (
    token_id        TEXT PRIMARY KEY,
    agent_id        TEXT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at      TIMESTAMPTZ,
    last_used_at    TIMESTAMPTZ
);
CREATE INDEX idx_agent_tokens_agent_id ON agent_tokens (agent_id, created_at);

CREATE TABLE agents (
    agent_id            TEXT PRIMARY KEY,
    platform            TEXT NOT NULL,
    region              TEXT NOT NULL DEFAULT 'default',
    labels              JSONB NOT NULL DEFAULT '{}',
    status              TEXT NOT NULL DEFAULT 'offline' CHECK (status IN ('online', 'offline')),
    capacity            JSONB NOT NULL DEFAULT '{"max_sessions": 0}',
    usage               JSONB NOT NULL DEFAULT '{}',
    metadata            JSONB NOT NULL DEFAULT '{}',
    websocket_conn_id   TEXT,
    last_heartbeat      TIMESTAMPTZ,
    fencing_epoch       BIGINT NOT NULL DEFAULT 0 CHECK (fencing_epoch >= 0),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_agents_platform ON agents (platform);
CREATE INDEX idx_agents_status ON agents (status);
CREATE INDEX idx_agents_last_heartbeat ON agents (last_heartbeat);

CREATE TABLE templates (
    name                TEXT PRIMARY KEY,
    display_name        TEXT NOT NULL DEFAULT '',
    description         TEXT NOT NULL DEFAULT '',
    image               TEXT,
    command             JSONB NOT NULL DEFAULT '[]',
    vnc_port            INTEGER NOT NULL DEFAULT 5900,
    resources           JSONB NOT NULL DEFAULT '{}',
    env                 JSONB NOT NULL DEFAULT '{}',
    persistent_home     BOOLEAN NOT NULL DEFAULT FALSE,
    platform            TEXT,
    region              TEXT,
    labels              JSONB NOT NULL DEFAULT '{}',
    platform_options    JSONB NOT NULL DEFAULT '{}',
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    "user"              TEXT NOT NULL,
    template            TEXT NOT NULL,
    template_snapshot   JSONB NOT NULL,
    desired_state       TEXT NOT NULL DEFAULT 'running'
                        CHECK (desired_state IN ('running', 'hibernated', 'stopped')),
    state               TEXT NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'scheduled', 'starting', 'running', 'stopping',
                                         'stopped', 'hibernated', 'failed', 'lost')),
    generation          BIGINT NOT NULL DEFAULT 1 CHECK (generation >= 1),
    agent_id            TEXT,
    platform            TEXT,
    platform_metadata   JSONB NOT NULL DEFAULT '{}',
    reason              TEXT NOT NULL DEFAULT '',
    labels              JSONB NOT NULL DEFAULT '{}',
    region              TEXT,
    forget              BOOLEAN NOT NULL DEFAULT FALSE,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
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
    generation          BIGINT NOT NULL CHECK (generation >= 1),
    command_type        TEXT NOT NULL,
    command_data        JSONB NOT NULL DEFAULT '{}',
    status              TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'sent', 'acked', 'completed', 'failed',
                                          'expired')),
    result              JSONB,
    attempts            INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at             TIMESTAMPTZ,
    acked_at            TIMESTAMPTZ,
    completed_at        TIMESTAMPTZ,
    next_attempt_at     TIMESTAMPTZ,
    CONSTRAINT uq_agent_commands_session_generation_type
        UNIQUE (session_id, generation, command_type)
);
CREATE INDEX idx_agent_commands_due ON agent_commands (agent_id, status, next_attempt_at);
CREATE INDEX idx_agent_commands_status_created ON agent_commands (status, created_at);

CREATE TABLE session_events (
    id                  BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    session_id          TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    state               TEXT NOT NULL,
    previous_state      TEXT,
    detail              TEXT NOT NULL DEFAULT '',
    at                  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_session_events_session_id ON session_events (session_id, id);

CREATE TABLE audit_log (
    id                  BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    actor               TEXT NOT NULL,
    action              TEXT NOT NULL,
    resource            TEXT NOT NULL,
    detail              JSONB NOT NULL DEFAULT '{}',
    at                  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_audit_log_at ON audit_log (at);
