"""What crosses a process boundary: the control-plane messages and their schema
(protocol), authentication and the Python side of the data-plane handshake (auth),
and the asyncio helpers both ends of the control plane run on (aio). Imported by the
peer and the master alike; imports neither."""
