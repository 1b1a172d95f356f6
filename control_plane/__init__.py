"""The control plane: the admin REST API over Postgres and the gRPC config stream to data planes."""
