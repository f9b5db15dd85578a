-- DB mode's first schema: teams, virtual keys (stored as sha256 only) and one spend row per request.
-- Portable SQL: the same file runs on SQLite and PostgreSQL. Timestamps are TEXT, ISO-8601 UTC with
-- microseconds ("2026-11-24T20:49:40.123000Z"), so that they sort as text; booleans are INTEGER 0/1;
-- models and metadata are JSON text.

CREATE TABLE llmgate_teams (
    team_id          TEXT PRIMARY KEY,
    team_alias       TEXT,
    models           TEXT NOT NULL DEFAULT '[]',
    max_budget       DOUBLE PRECISION,
    budget_duration  TEXT,
    budget_reset_at  TEXT,
    rpm_limit        BIGINT,
    tpm_limit        BIGINT,
    spend            DOUBLE PRECISION NOT NULL DEFAULT 0,
    blocked          INTEGER NOT NULL DEFAULT 0 CHECK (blocked IN (0, 1)),
    metadata         TEXT NOT NULL DEFAULT '{}',
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);

CREATE TABLE llmgate_keys (
    token_hash             TEXT PRIMARY KEY CHECK (length(token_hash) = 64),
    key_name               TEXT NOT NULL,
    key_alias              TEXT UNIQUE,
    team_id                TEXT,
    models                 TEXT NOT NULL DEFAULT '[]',
    rpm_limit              BIGINT,
    tpm_limit              BIGINT,
    max_parallel_requests  BIGINT,
    max_budget             DOUBLE PRECISION,
    budget_duration        TEXT,
    budget_reset_at        TEXT,
    spend                  DOUBLE PRECISION NOT NULL DEFAULT 0,
    expires                TEXT,
    blocked                INTEGER NOT NULL DEFAULT 0 CHECK (blocked IN (0, 1)),
    metadata               TEXT NOT NULL DEFAULT '{}',
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL
);

CREATE INDEX llmgate_keys_by_created ON llmgate_keys (created_at);
CREATE INDEX llmgate_keys_by_team ON llmgate_keys (team_id, created_at);

CREATE TABLE llmgate_spend_logs (
    request_id         TEXT PRIMARY KEY,
    token_hash         TEXT,
    team_id            TEXT,
    model              TEXT,
    prompt_tokens      BIGINT NOT NULL DEFAULT 0,
    completion_tokens  BIGINT NOT NULL DEFAULT 0,
    total_tokens       BIGINT NOT NULL DEFAULT 0,
    spend              DOUBLE PRECISION NOT NULL DEFAULT 0,
    status             BIGINT,
    start_time         TEXT NOT NULL
);

CREATE INDEX llmgate_spend_logs_by_time ON llmgate_spend_logs (start_time);
CREATE INDEX llmgate_spend_logs_by_key ON llmgate_spend_logs (token_hash, start_time);
CREATE INDEX llmgate_spend_logs_by_team ON llmgate_spend_logs (team_id, start_time);
