"""The router: admission, tokenizing, prefix indexes, scoring and the HTTP app.

The routing logic (policy, prefix_index, admission) is pure and imports no
heavy library, so `pdbox replay` and the unit tests can use it offline.
"""
