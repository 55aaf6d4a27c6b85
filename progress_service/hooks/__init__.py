"""Claude Code sessions the service did not start, watched through HTTP hooks.

``mapping`` turns hook bodies into the job events the worker publishes,
``ingest`` appends them (one task per process, bounded queue), ``install``
writes the Claude Code settings that send them, and
``progress_service.api.hooks`` is the route they arrive at.
"""
