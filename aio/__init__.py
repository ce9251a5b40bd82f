"""The asyncio skins the store node, the client library and the vnet agent stand on.

The core (:mod:`tmdht`, :mod:`tmdht.net`) does no IO; :mod:`tmdht.node` and :mod:`tmdht.client`
do, and neither imports the other. What both need to do IO the same way lives here, once:

- :mod:`tmdht.aio.dataplane` — :class:`~tmdht.aio.dataplane.DataPlaneClient`, the UDP skin over
  the sans-IO request engine (:mod:`tmdht.net.engine`);
- :mod:`tmdht.aio.overlay` — :class:`~tmdht.aio.overlay.Overlay`, ring membership and routing
  on the kademlia package, over the sans-IO :class:`~tmdht.net.membership.PeerBook`
  (:mod:`tmdht.aio.kademlia`: what is kept from the package and how it is fixed);
- :mod:`tmdht.aio.sockets` — UDP sockets with tuned kernel buffers;
- :mod:`tmdht.aio.http` — a service's ``/metrics``, ``/healthz`` and ``/readyz`` endpoint;
  :mod:`tmdht.aio.service` — a service stops on SIGTERM/SIGINT;
- :mod:`tmdht.aio.tasks` — background tasks with an owner.
"""
