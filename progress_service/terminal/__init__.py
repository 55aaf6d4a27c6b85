"""The terminal client: ``progress-service submit`` / ``watch`` follow jobs live.

``api`` (HTTP), ``backoff`` (reconnect policy), ``client`` (the reconnecting
WebSocket follower), ``render`` (rich panel or plain lines), ``commands``
(the subcommands).
"""
