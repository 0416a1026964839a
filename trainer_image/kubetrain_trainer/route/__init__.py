"""The router in front of a ModelService's variants (`kubetrain route`, docs/router.md).

`app` (routes, proxying, the config reload), `assign` (the sticky weighted split),
`exchange` (what is logged of an answer), `metrics` (`kubetrain_route_*`), `store` (the
durable log of requests and responses and the feedback on them, in SQLite for one replica
or PostgreSQL for several). Its contracts with the operator (config file, headers,
`/stats`) are in kubetrain_api/routing.py. The router imports nothing of training and not
the model server's engine (no torch), only the server's error and schema modules.
"""
