-- Usage reported by data planes: per (tenant, route, period start, status class) counters at
-- three resolutions. Data planes' batches land in usage_minute; a scheduled rollup moves
-- minute rows older than two days into usage_hour and hour rows older than sixty days into
-- usage_day (control_plane/store/usage.py). A row lives in exactly one table at a time, so a
-- query adds the three tables up without counting anything twice.
-- No foreign keys: a batch about a tenant or route deleted meanwhile is still stored.

-- Each stored batch, so that a batch sent again (same node and seq) is not counted twice.
CREATE TABLE usage_batches (
    node_id      text        NOT NULL,
    seq          bigint      NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, seq)
);
CREATE INDEX usage_batches_received_at_idx ON usage_batches (received_at);

-- Latency histograms are bigint[] of per-bucket counts (bounds in shared/usage.py); they add
-- up element by element, so quantiles come from merged counts.
CREATE FUNCTION usage_add_buckets(a bigint[], b bigint[]) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT CASE
            WHEN a IS NULL THEN b
            WHEN b IS NULL THEN a
            ELSE ARRAY(
                SELECT coalesce(x, 0) + coalesce(y, 0)
                FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i)
                ORDER BY i)
        END
    $$;

CREATE AGGREGATE usage_sum_buckets(bigint[]) (SFUNC = usage_add_buckets, STYPE = bigint[]);

CREATE TABLE usage_minute (
    tenant_id     uuid        NOT NULL,
    start         timestamptz NOT NULL,
    route_id      uuid        NOT NULL,
    status_class  smallint    NOT NULL CHECK (status_class BETWEEN 0 AND 9),
    requests      bigint      NOT NULL CHECK (requests >= 0),
    errors        bigint      NOT NULL CHECK (errors >= 0),
    rejected      bigint      NOT NULL CHECK (rejected >= 0),
    bytes_in      bigint      NOT NULL CHECK (bytes_in >= 0),
    bytes_out     bigint      NOT NULL CHECK (bytes_out >= 0),
    latency       bigint[]    NOT NULL,
    PRIMARY KEY (tenant_id, start, route_id, status_class)
);
CREATE INDEX usage_minute_start_idx ON usage_minute (start);

CREATE TABLE usage_hour (LIKE usage_minute INCLUDING ALL);
CREATE TABLE usage_day (LIKE usage_minute INCLUDING ALL);
