-- Identity: JWT issuers and OAuth clients per tenant, and the gateway's own token-signing keys.
--
-- Secrets at rest: there is no KMS in this deployment, so jwt_issuers.hs256_secret and
-- signing_keys.private_key_pem are stored as given. Neither is ever returned by the admin API
-- nor written to the audit trail; they leave the control plane only inside snapshots, to data
-- planes, which need them to verify (HS256) and sign (ES256) tokens. OAuth client secrets are
-- stored only as SHA-256 hashes of 256-bit random values.

CREATE TABLE jwt_issuers (
    id               uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    seq              bigint        GENERATED ALWAYS AS IDENTITY UNIQUE,
    tenant_id        uuid          NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    issuer           varchar(512)  NOT NULL CHECK (length(issuer) > 0),
    audience         varchar(512)  NOT NULL CHECK (length(audience) > 0),
    algorithms       text[]        NOT NULL CHECK (cardinality(algorithms) > 0),
    -- Exactly one key source.
    jwks             jsonb,
    jwks_uri         varchar(2048),
    public_key_pem   text,
    hs256_secret     bytea         CHECK (octet_length(hs256_secret) >= 32),
    -- For jwks_uri issuers: the last good keys the control plane fetched, when, and the last
    -- fetch error (cleared by the next success; the last good keys are kept on failure).
    fetched_jwks     jsonb,
    jwks_fetched_at  timestamptz,
    jwks_error       text,
    created_at       timestamptz   NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, issuer),
    -- A token's (iss, aud) names exactly one tenant: no tenant can claim another's issuer.
    UNIQUE (issuer, audience),
    CHECK (num_nonnulls(jwks, jwks_uri, public_key_pem, hs256_secret) = 1),
    CHECK (jwks_uri IS NOT NULL OR (fetched_jwks IS NULL AND jwks_fetched_at IS NULL AND jwks_error IS NULL))
);
CREATE INDEX jwt_issuers_jwks_uri_idx ON jwt_issuers (seq) WHERE jwks_uri IS NOT NULL;

CREATE TABLE oauth_clients (
    id           uuid          PRIMARY KEY DEFAULT gen_random_uuid(),
    seq          bigint        GENERATED ALWAYS AS IDENTITY UNIQUE,
    tenant_id    uuid          NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         varchar(255)  NOT NULL CHECK (length(name) > 0),
    client_id    varchar(64)   NOT NULL UNIQUE,
    secret_hash  bytea         NOT NULL UNIQUE CHECK (octet_length(secret_hash) = 32),
    scopes       text[]        NOT NULL DEFAULT '{}',
    created_at   timestamptz   NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX oauth_clients_tenant_idx ON oauth_clients (tenant_id, seq);

-- The keys data planes sign their OAuth access tokens with. kid: the RFC 7638 thumbprint.
CREATE TABLE signing_keys (
    kid              varchar(64)   PRIMARY KEY,
    algorithm        varchar(16)   NOT NULL CHECK (algorithm = 'ES256'),
    private_key_pem  text          NOT NULL,
    public_jwk       jsonb         NOT NULL,
    created_at       timestamptz   NOT NULL DEFAULT now(),
    retired_at       timestamptz
);
