"""Serving: scheduler (plain Python), engine (jitted prefill/decode), sampling, stops, and the
HTTP layer: api (request/response schemas), routes (the /v1 endpoints), server (the app)."""
