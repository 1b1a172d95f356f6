-- Shadow mode for a route's limits: the data planes decide and count every limit as usual
-- but never refuse a request for it, so a new limit can be watched before it is enforced.
ALTER TABLE routes ADD COLUMN rate_limit_shadow boolean NOT NULL DEFAULT false;
