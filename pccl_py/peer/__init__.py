"""The peer side: the Communicator (the public facade), the Session that owns what the
peer knows of the master, the control channel that talks to it, shared-state
transfer, bandwidth probes, and join_group. Imports wire, never the master."""
