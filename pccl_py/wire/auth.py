"""Shared-secret authentication: the challenge-response MACs of the control plane and
the connector side of the data-plane handshake (for the master's liveness connection).

Both planes prove knowledge of the secret with HMAC-SHA256 over fresh random nonces
from both sides, so the secret never travels and a recorded exchange replayed later
fails. Control plane (docs/protocol.md, "Authentication"):

    peer -> master  auth_begin {nonce_p}
    master -> peer  auth_challenge {nonce_m, proof = MAC("pccl-ctl-v1 master", nonce_p, nonce_m)}
    peer -> master  auth {mac = MAC("pccl-ctl-v1 client", nonce_m, nonce_p)}
    master -> peer  auth_ok {}            (or error {code: "auth"}; the challenge is spent)

The data-plane handshake is defined in native/include/pccl/wire.hpp; the engine does
it in C++, and `data_handshake` below speaks the connector side for the master.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import socket
import struct

from pccl_py import _native
from pccl_py.errors import AuthError, ConfigError, ProtocolError

NONCE_BYTES = _native.NONCE_BYTES
_CTL_MASTER = b"pccl-ctl-v1 master"
_CTL_CLIENT = b"pccl-ctl-v1 client"
# The data-plane handshake is the engine's (native/src/transport/handshake.cpp): its
# layouts and MAC labels come from the binding, so this side cannot drift from it.
_DATA_CONNECTOR = _native.HANDSHAKE_CONNECTOR_LABEL
_DATA_ACCEPTOR = _native.HANDSHAKE_ACCEPTOR_LABEL
_HELLO = struct.Struct(_native.HELLO_FORMAT)
_HELLO_ACK = struct.Struct(_native.HELLO_ACK_FORMAT)
_AUTH_PROOF = struct.Struct(_native.AUTH_PROOF_FORMAT)
_AUTH_RESULT = struct.Struct(_native.AUTH_RESULT_FORMAT)
_TRANSCRIPT = struct.Struct(_native.HANDSHAKE_TRANSCRIPT_FORMAT)


def normalize_secret(secret: str | bytes | None) -> bytes | None:
    """The secret as bytes (str is UTF-8 encoded); None when absent. An empty secret is
    a mistake, not "no secret"."""
    if secret is None:
        return None
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not raw:
        raise ConfigError("the shared secret is empty")
    return raw


def read_secret_file(path: str) -> bytes:
    """The secret stored in `path` (a trailing newline is not part of it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
    secret = normalize_secret(raw.rstrip(b"\r\n"))
    assert secret is not None
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256(secret, label || parts...): the control plane's proofs, the data-plane
    handshake's (the connector side here) and the join knock's (pccl_py.wire.knock)."""
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


def master_proof(secret: bytes, nonce_client: bytes, nonce_master: bytes) -> bytes:
    return mac(secret, _CTL_MASTER, nonce_client, nonce_master)


def client_proof(secret: bytes, nonce_master: bytes, nonce_client: bytes) -> bytes:
    return mac(secret, _CTL_CLIENT, nonce_master, nonce_client)


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on the loopback interface (names are resolved)."""
    if host == "localhost":
        return True
    if host in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


async def data_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    my_id: int,
    expected_peer: int,
    epoch: int,
    secret: bytes | None,
) -> None:
    """The connector side of the data-plane handshake (wire.hpp), as the engine does it.
    Raises AuthError (secrets differ, or only one side has one) or ProtocolError."""
    hello = _HELLO.pack(_native.HELLO_MAGIC, _native.PROTOCOL_VERSION, my_id, epoch, 0, 1)
    writer.write(hello)
    magic, status, peer, flags, _, nonce_a = _HELLO_ACK.unpack(await reader.readexactly(_HELLO_ACK.size))
    if magic != _native.HELLO_MAGIC or status != _native.HELLO_STATUS_OK:
        raise ProtocolError(f"peer {expected_peer} refused the handshake (status {status})", peer=expected_peer)
    if peer != expected_peer:
        raise ProtocolError(f"the data port belongs to peer {peer}, expected {expected_peer}", peer=expected_peer)
    wants_auth = bool(flags & _native.HELLO_AUTH)
    if not wants_auth and secret is None:
        return
    if secret is None:
        raise AuthError(f"peer {peer} requires a shared secret and none is configured", peer=peer)
    if not wants_auth:
        raise AuthError(f"peer {peer} does not authenticate (it has no shared secret)", peer=peer)
    nonce_c = new_nonce()
    transcript = _TRANSCRIPT.pack(nonce_a, nonce_c, my_id, peer, epoch, 0, 1)
    writer.write(_AUTH_PROOF.pack(nonce_c, mac(secret, _DATA_CONNECTOR, transcript)))
    magic, status, their_mac = _AUTH_RESULT.unpack(await reader.readexactly(_AUTH_RESULT.size))
    if magic != _native.HELLO_MAGIC:
        raise ProtocolError(f"peer {peer} sent a malformed authentication result", peer=peer)
    if status != 0:
        raise AuthError(f"peer {peer} refused the connection: the shared secrets differ", peer=peer)
    if not verify(mac(secret, _DATA_ACCEPTOR, transcript), their_mac):
        raise AuthError(f"peer {peer} failed to prove the shared secret", peer=peer)
