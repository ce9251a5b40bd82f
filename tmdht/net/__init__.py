"""The cluster layer, sans-IO: what both the store node and the client need to talk to a ring.

- :mod:`tmdht.net.address` — (host, port) of cluster sockets;
- :mod:`tmdht.net.credentials` — the cluster keys (:class:`~.credentials.ClusterCredentials`)
  and where a cluster is reached (:class:`~.credentials.ClusterAccess`);
- :mod:`tmdht.net.overlay` — the overlay's configuration and datagram format (rpcudp framing,
  cluster tag, validated answers); :mod:`tmdht.net.identity` — a node's persistent id;
- :mod:`tmdht.net.membership` — members, membership events and the liveness rules
  (:class:`~tmdht.net.membership.PeerBook`);
- :mod:`tmdht.net.engine` — the request engine: GET, HAS, PUT and NODE_INFO to store nodes with
  windows, adaptive timeouts, retries, hedging, failover and verification, driven by
  ``receive_datagram(data, addr, now)`` and ``handle_timer(now)``
  (:mod:`tmdht.net.operations`: its inputs and outputs; :mod:`tmdht.net.window`: its flow
  control).

Nothing here opens a socket, runs an event loop or reads a clock: :mod:`tmdht.aio` holds the
asyncio skins over these state machines.
"""
