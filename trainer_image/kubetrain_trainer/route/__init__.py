"""The router in front of a ModelService's variants (`kubetrain route`).

`store` is its durable log of requests and responses and the feedback on them, in SQLite
(one replica) or PostgreSQL (several); the router imports nothing of training, like the
model server next to it.
"""
