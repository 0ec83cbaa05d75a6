-- Licenses and channel links: the Node gateway's schema, with its constraints made explicit.

CREATE TABLE user_licenses (
    user_id         text PRIMARY KEY CHECK (user_id <> '' AND length(user_id) <= 255),
    email           text,
    license_type    text NOT NULL DEFAULT 'free'
                    CHECK (license_type IN ('free', 'pro', 'enterprise')),
    -- Typed in dexorder.core.licenses: FeatureFlags and LicenseLimits.
    features        jsonb NOT NULL DEFAULT '{}'::jsonb
                    CHECK (jsonb_typeof(features) = 'object'),
    resource_limits jsonb NOT NULL DEFAULT '{}'::jsonb
                    CHECK (jsonb_typeof(resource_limits) = 'object'),
    -- Non-empty: the user's own MCP server, used instead of provisioning an agent.
    mcp_server_url  text,
    -- NULL: never expires. Past: the user falls back to the free tier.
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION dexorder_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER user_licenses_touch_updated_at
    BEFORE UPDATE ON user_licenses
    FOR EACH ROW EXECUTE FUNCTION dexorder_touch_updated_at();

CREATE TABLE user_channel_links (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         text NOT NULL REFERENCES user_licenses (user_id) ON DELETE CASCADE,
    channel_type    text NOT NULL CHECK (channel_type ~ '^[a-z][a-z0-9_]{0,31}$'),
    channel_user_id text NOT NULL CHECK (channel_user_id <> ''),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- One account on a channel belongs to one user.
    UNIQUE (channel_type, channel_user_id)
);

CREATE INDEX user_channel_links_by_user ON user_channel_links (user_id);
