"""The tmdht store node service: Kademlia ring, UDP page data plane, LMDB storage."""
