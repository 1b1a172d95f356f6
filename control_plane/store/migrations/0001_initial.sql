-- The first schema: tenants, their API keys, routes, and the config version.
-- Every admin write bumps config_version.version in the same transaction as the change.

CREATE TABLE config_version (
    id          smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version     bigint      NOT NULL CHECK (version > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO config_version (id, version) VALUES (1, 1);

CREATE TABLE tenants (
    id                     uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    seq                    bigint       GENERATED ALWAYS AS IDENTITY UNIQUE,
    name                   varchar(255) NOT NULL CHECK (length(name) > 0),
    tier                   varchar(20)  NOT NULL CHECK (tier IN ('free', 'basic', 'premium', 'enterprise')),
    rate_limit_per_minute  integer      NOT NULL CHECK (rate_limit_per_minute >= 0),
    rate_limit_per_hour    integer      NOT NULL CHECK (rate_limit_per_hour >= 0),
    monthly_quota          bigint       NOT NULL DEFAULT 0 CHECK (monthly_quota >= 0),
    max_concurrency        integer      NOT NULL DEFAULT 0 CHECK (max_concurrency >= 0),
    is_active              boolean      NOT NULL DEFAULT true,
    created_at             timestamptz  NOT NULL DEFAULT now(),
    updated_at             timestamptz  NOT NULL DEFAULT now()
);

-- A tenant may hold several live keys at once (rotation), so key hashes live in their own table.
CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_hash    bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    prefix      varchar(32) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant_id_idx ON api_keys (tenant_id);

CREATE TABLE routes (
    id                   uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    seq                  bigint        GENERATED ALWAYS AS IDENTITY UNIQUE,
    path_pattern         varchar(1024) NOT NULL,
    upstream_url         varchar(2048) NOT NULL,
    methods              varchar(10)[] NOT NULL DEFAULT '{}',
    auth_required        boolean       NOT NULL DEFAULT true,
    rate_limit_override  integer       CHECK (rate_limit_override > 0),
    timeout_ms           integer       NOT NULL DEFAULT 30000 CHECK (timeout_ms > 0),
    strip_prefix         boolean       NOT NULL DEFAULT false,
    priority             integer       NOT NULL DEFAULT 0,
    is_active            boolean       NOT NULL DEFAULT true,
    created_at           timestamptz   NOT NULL DEFAULT now(),
    updated_at           timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX routes_path_pattern_idx ON routes (path_pattern);
