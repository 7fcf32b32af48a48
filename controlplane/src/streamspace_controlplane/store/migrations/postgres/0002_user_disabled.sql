-- Version 2 (PostgreSQL): users can be disabled (PATCH /api/v1/users/{username}), and the
-- tokens issued to them cut off (token_epoch, which each JWT carries). Existing users stay
-- enabled, at epoch 0. Keep it in step with ../sqlite/0002_user_disabled.sql.

ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE users ADD COLUMN token_epoch BIGINT NOT NULL DEFAULT 0 CHECK (token_epoch >= 0);
