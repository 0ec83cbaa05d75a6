-- Daily usage per user, aggregated by the gateway for limits and for the user.
-- No foreign key to user_licenses: usage is a record, and outlives a deleted license.

CREATE TABLE usage_daily (
    user_id           text NOT NULL CHECK (user_id <> ''),
    day               date NOT NULL,
    prompt_tokens     bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    messages          integer NOT NULL DEFAULT 0 CHECK (messages >= 0),
    PRIMARY KEY (user_id, day)
);
