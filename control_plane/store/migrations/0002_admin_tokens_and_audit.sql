-- Admin tokens with roles, and the audit trail of every admin write.

CREATE TABLE admin_tokens (
    id          uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    seq         bigint       GENERATED ALWAYS AS IDENTITY UNIQUE,
    name        varchar(255) NOT NULL CHECK (length(name) > 0),
    role        varchar(20)  NOT NULL CHECK (role IN ('admin', 'tenant_admin', 'viewer')),
    tenant_id   uuid         REFERENCES tenants (id) ON DELETE CASCADE,
    token_hash  bytea        NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    prefix      varchar(32)  NOT NULL,
    created_by  varchar(255) NOT NULL,
    created_at  timestamptz  NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((role = 'tenant_admin') = (tenant_id IS NOT NULL))
);

CREATE TABLE audit_log (
    id              bigint       GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz  NOT NULL DEFAULT now(),
    actor           varchar(255) NOT NULL,
    actor_role      varchar(20)  NOT NULL,
    action          varchar(32)  NOT NULL,
    object_type     varchar(32)  NOT NULL,
    object_id       text         NOT NULL,
    before          jsonb,
    after           jsonb,
    config_version  bigint       NOT NULL
);
CREATE INDEX audit_log_object_idx ON audit_log (object_type, object_id);

-- Key listings per tenant, newest last.
CREATE INDEX api_keys_tenant_created_idx ON api_keys (tenant_id, created_at);
