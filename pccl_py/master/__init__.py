"""The master side: the server (I/O only), the pure decision core it drives
(membership, election, topology) and its metrics. Imports wire, never the peer."""
