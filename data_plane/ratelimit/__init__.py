"""Shared counters in Redis: connection and health today; the limiters build on it."""
