-- Every optional route field of the admin API, carried in the snapshot.
--
-- Conventions: an empty array means "no restriction" (tenants, tiers, scopes; methods already
-- works this way); NULL means "off" (host, hash_on, burst, circuit_breaker, health_check).
-- The admin API validates first and names the field; these constraints are the floor that
-- holds whatever writes the table.

ALTER TABLE routes
    -- [{"url": "...", "weight": n}, ...], in order. upstream_url stays the first one's url, so
    -- the seed column keeps meaning what it meant.
    ADD COLUMN upstreams          jsonb,
    ADD COLUMN load_balancing     varchar(32)   NOT NULL DEFAULT 'round_robin',
    -- Only with consistent_hash, and then always set: 'tenant', 'ip' or 'header:<Name>'.
    ADD COLUMN hash_on            varchar(300),
    -- Exact, lower-case host name the request's Host must equal; NULL: any host.
    ADD COLUMN host               varchar(253),
    -- {"lower-case-name": "exact value", ...}: every one must match.
    ADD COLUMN headers            jsonb         NOT NULL DEFAULT '{}',
    -- No foreign key on an array: a deleted tenant's id stays here, so a route restricted to
    -- it alone serves nobody rather than everybody.
    ADD COLUMN tenants            uuid[]        NOT NULL DEFAULT '{}',
    ADD COLUMN tiers              varchar(20)[] NOT NULL DEFAULT '{}',
    ADD COLUMN scopes             varchar(128)[] NOT NULL DEFAULT '{}',
    ADD COLUMN retries            integer       NOT NULL DEFAULT 0,
    ADD COLUMN websocket          boolean       NOT NULL DEFAULT false,
    -- 0: unlimited.
    ADD COLUMN max_body_bytes     bigint        NOT NULL DEFAULT 10485760,
    -- {"failure_rate", "min_requests", "window_s", "open_s", "half_open_requests"}; NULL: off.
    ADD COLUMN circuit_breaker    jsonb,
    -- {"path", "interval_s", "healthy", "unhealthy"}; NULL: no active checks.
    ADD COLUMN health_check       jsonb,
    -- Token-bucket burst on top of rate_limit_override; NULL: sliding window only.
    ADD COLUMN burst              integer;

UPDATE routes SET upstreams = jsonb_build_array(jsonb_build_object('url', upstream_url, 'weight', 1));

ALTER TABLE routes
    ALTER COLUMN upstreams SET NOT NULL,
    ADD CONSTRAINT routes_upstreams_check CHECK (
        jsonb_typeof(upstreams) = 'array'
        AND jsonb_array_length(upstreams) BETWEEN 1 AND 64
        AND upstreams -> 0 ->> 'url' = upstream_url
    ),
    ADD CONSTRAINT routes_load_balancing_check CHECK (
        load_balancing IN ('round_robin', 'least_connections', 'consistent_hash')
    ),
    ADD CONSTRAINT routes_hash_on_check CHECK (
        (load_balancing = 'consistent_hash') = (hash_on IS NOT NULL)
        AND (hash_on IS NULL OR hash_on IN ('tenant', 'ip') OR hash_on ~ '^header:[!#$%&''*+.^_`|~0-9A-Za-z-]+$')
    ),
    ADD CONSTRAINT routes_host_check CHECK (host IS NULL OR (length(host) > 0 AND host = lower(host))),
    ADD CONSTRAINT routes_headers_check CHECK (jsonb_typeof(headers) = 'object'),
    ADD CONSTRAINT routes_tiers_check CHECK (
        tiers <@ ARRAY['free', 'basic', 'premium', 'enterprise']::varchar(20)[]
    ),
    ADD CONSTRAINT routes_retries_check CHECK (retries BETWEEN 0 AND 10),
    ADD CONSTRAINT routes_max_body_bytes_check CHECK (max_body_bytes >= 0),
    ADD CONSTRAINT routes_burst_check CHECK (
        burst IS NULL OR (burst > 0 AND rate_limit_override IS NOT NULL)
    ),
    ADD CONSTRAINT routes_circuit_breaker_check CHECK (
        circuit_breaker IS NULL OR (
            jsonb_typeof(circuit_breaker) = 'object'
            AND (circuit_breaker ->> 'failure_rate')::double precision > 0
            AND (circuit_breaker ->> 'failure_rate')::double precision <= 1
            AND (circuit_breaker ->> 'min_requests')::integer BETWEEN 1 AND 1000000
            AND (circuit_breaker ->> 'window_s')::integer BETWEEN 1 AND 3600
            AND (circuit_breaker ->> 'open_s')::integer BETWEEN 1 AND 3600
            AND (circuit_breaker ->> 'half_open_requests')::integer BETWEEN 1 AND 1000
        )
    ),
    ADD CONSTRAINT routes_health_check_check CHECK (
        health_check IS NULL OR (
            jsonb_typeof(health_check) = 'object'
            AND left(health_check ->> 'path', 1) = '/'
            AND (health_check ->> 'interval_s')::integer BETWEEN 1 AND 3600
            AND (health_check ->> 'healthy')::integer BETWEEN 1 AND 100
            AND (health_check ->> 'unhealthy')::integer BETWEEN 1 AND 100
        )
    );
