"""The tmdht store node service: Kademlia ring, UDP page data plane, LMDB storage.

- :mod:`tmdht.node.service` — :class:`~tmdht.node.service.StoreNode`, what ``tmdht node run``
  runs: it owns the parts below and starts and stops them in order;
- :mod:`tmdht.node.storage` — the LMDB page store; :mod:`tmdht.node.dataplane` — the UDP data
  plane server; :mod:`tmdht.node.replication` — the replication job; :mod:`tmdht.node.metrics`
  — Prometheus metrics (served with health by :mod:`tmdht.aio.http`);
- :mod:`tmdht.node.local` — local clusters of node processes (development, tests, benchmarks).

It stands on the core (:mod:`tmdht`, :mod:`tmdht.net`) and the shared asyncio skins
(:mod:`tmdht.aio`: the overlay, the request transport); it never imports the client library.
"""
