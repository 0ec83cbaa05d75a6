-- Single-use codes that link a channel account (Telegram) to a logged-in web user.
-- Only a SHA-256 of each code is stored, so a read of this table links nobody.

CREATE TABLE link_codes (
    code_hash    text PRIMARY KEY CHECK (code_hash ~ '^[0-9a-f]{64}$'),
    user_id      text NOT NULL REFERENCES user_licenses (user_id) ON DELETE CASCADE,
    channel_type text NOT NULL CHECK (channel_type ~ '^[a-z][a-z0-9_]{0,31}$'),
    expires_at   timestamptz NOT NULL,
    -- Set when the code is redeemed; a used code never links again.
    used_at      timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX link_codes_by_expiry ON link_codes (expires_at);
