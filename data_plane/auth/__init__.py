"""Authentication of clients on the data plane."""
