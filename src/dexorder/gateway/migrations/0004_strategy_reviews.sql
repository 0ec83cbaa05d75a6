-- One row per strategy review (the workflow's checkpoints live in LangGraph's tables).
-- `status` is the guard that lets an answer resume a review once, on any replica.

CREATE TABLE strategy_reviews (
    review_id     text PRIMARY KEY,
    user_id       text NOT NULL CHECK (user_id <> ''),
    strategy_name text NOT NULL,
    dataset       text NOT NULL,
    status        text NOT NULL CHECK (status IN
                    ('running', 'awaiting_approval', 'deciding', 'approved', 'rejected', 'failed')),
    decision      text CHECK (decision IN ('approved', 'rejected')),
    detail        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX strategy_reviews_by_user ON strategy_reviews (user_id, status);
