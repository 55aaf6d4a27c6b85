"""The SQL store: what must last (users, tokens, jobs, comments, audit log)."""
