"""HTTP API controllers."""
