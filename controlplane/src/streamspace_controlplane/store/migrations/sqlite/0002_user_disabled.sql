-- Version 2 (SQLite): users can be disabled (PATCH /api/v1/users/{username}), and the
-- tokens issued to them cut off (token_epoch, which each JWT carries). Existing users stay
-- enabled, at epoch 0. Keep it in step with ../postgres/0002_user_disabled.sql.

ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1));
ALTER TABLE users ADD COLUMN token_epoch INTEGER NOT NULL DEFAULT 0 CHECK (token_epoch >= 0);
