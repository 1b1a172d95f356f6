"""Talking to upstream services: the pooled client and per-route targets."""
