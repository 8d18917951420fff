"""Serving: engine, scheduler, sampling, server."""
