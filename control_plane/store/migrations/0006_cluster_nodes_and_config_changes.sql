-- Config distribution across control-plane replicas.
--
-- cluster_nodes: every replica writes the state of the data-plane nodes connected to it (on
-- Hello, ACK, NACK, disconnect, and a periodic heartbeat), so that any replica can answer
-- GET /admin/nodes. A node whose last_seen is old is reported disconnected, whatever
-- `connected` says: the replica that held it may have died without saying so.
CREATE TABLE cluster_nodes (
    node_id           varchar(128) PRIMARY KEY,
    address           text         NOT NULL,
    software_version  text         NOT NULL DEFAULT '',
    replica           text         NOT NULL,
    session           uuid         NOT NULL,
    connected         boolean      NOT NULL,
    config_version    bigint       NOT NULL DEFAULT 0,
    nacked_version    bigint       NOT NULL DEFAULT 0,
    last_error        text,
    last_seen         timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX cluster_nodes_last_seen_idx ON cluster_nodes (last_seen);

-- config_changes: which objects each config version touched, so that a replica rebuilds only
-- what changed and data planes receive deltas. Written by triggers, so no write path can
-- forget it; every write bumps config_version first (its row lock serialises writers), so the
-- version read here is the one the writing transaction commits.
CREATE TABLE config_changes (
    version     bigint      NOT NULL,
    kind        varchar(20) NOT NULL,
    object_id   text        NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX config_changes_version_idx ON config_changes (version);
CREATE INDEX config_changes_changed_at_idx ON config_changes (changed_at);

-- Old changes are pruned; a replica whose snapshot is older than the newest pruned version
-- reads everything instead.
CREATE TABLE config_changes_pruned (
    id       smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version  bigint   NOT NULL
);
INSERT INTO config_changes_pruned (id, version) SELECT 1, version FROM config_version WHERE id = 1;

CREATE FUNCTION tenantgate_record_config_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    object_id text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        object_id := to_jsonb(OLD) ->> TG_ARGV[1];
    ELSE
        object_id := to_jsonb(NEW) ->> TG_ARGV[1];
    END IF;
    INSERT INTO config_changes (version, kind, object_id)
        SELECT version, TG_ARGV[0], object_id FROM config_version WHERE id = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER tenants_config_change AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenantgate_record_config_change('tenant', 'id');
CREATE TRIGGER api_keys_config_change AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tenantgate_record_config_change('api_key', 'id');
CREATE TRIGGER routes_config_change AFTER INSERT OR UPDATE OR DELETE ON routes
    FOR EACH ROW EXECUTE FUNCTION tenantgate_record_config_change('route', 'id');
CREATE TRIGGER jwt_issuers_config_change AFTER INSERT OR UPDATE OR DELETE ON jwt_issuers
    FOR EACH ROW EXECUTE FUNCTION tenantgate_record_config_change('jwt_issuer', 'id');
CREATE TRIGGER oauth_clients_config_change AFTER INSERT OR UPDATE OR DELETE ON oauth_clients
    FOR EACH ROW EXECUTE FUNCTION tenantgate_record_config_change('oauth_client', 'id');
CREATE TRIGGER signing_keys_config_change AFTER INSERT OR UPDATE OR DELETE ON signing_keys
    FOR EACH ROW EXECUTE FUNCTION tenantgate_record_config_change('signing_key', 'kid');
