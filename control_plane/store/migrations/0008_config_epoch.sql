-- The config epoch: a random id made once per database, carried beside the version in every
-- snapshot and delta. A version number says where a config is in one database's history; the
-- epoch says which history. A data plane holding a config of another epoch (Postgres
-- recreated, or this database restored from a backup and its epoch changed, see
-- docs/operations.md) is sent the whole config, whatever the version numbers say.
ALTER TABLE config_version ADD COLUMN epoch text NOT NULL DEFAULT gen_random_uuid()::text;
