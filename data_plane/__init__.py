"""The data plane: a stateless aiohttp proxy serving the last snapshot it received."""
