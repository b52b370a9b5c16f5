"""Rules: deterministic functions of (state, device event, clock) that emit business events."""
