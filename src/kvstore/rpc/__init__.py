"""Thrift transport for kvstore: the only package that touches thriftpy2's transport layer
(tls.py: contexts and roles; framecheck.py: the request check; server.py; client.py).

Server: one thread per connection (like the seed's threaded server), framed
transport + binary protocol with thriftpy2's compiled codec. Unlike thriftpy2's
TServerSocket it never sets SO_REUSEPORT (two nodes must not share a port), and it
bounds what a peer can make it do:
- a frame header beyond ``max_frame_bytes`` is refused before the body is buffered;
- every request frame is received whole and walked by :func:`check_request` before
  thriftpy2 decodes it (the decoder can spin for seconds, holding the GIL, on a
  container of a non-data type: a 28-byte request once stalled a node for 6.8 s);
- at most ``max_connections`` connections (and threads) at once; more are refused
  with UNAVAILABLE;
- a client connection idle for ``idle_timeout_s`` is closed, well after a pooled
  Connection stops reusing it (REOPEN_AFTER_IDLE_S), so no request is written into
  a closing connection; the primary's replication connections never idle out;
- a frame must arrive whole within ``frame_deadline_s`` of its first byte;
- the replies clients have not read are bounded across connections by
  ``reply_budget_bytes`` (budget.py): past it a large reply is answered UNAVAILABLE, and
  a connection's codec is renewed after a large frame (its buffers never shrink).

Mutual TLS (optional; plaintext is the default): TLS 1.3 only, a certificate from the
cluster's CA required on both sides. The server runs each handshake in the connection's own
thread, bounded by the frame deadline, so a silent peer never stalls the accept loop; a
plaintext or unauthenticated peer is cut before any request is decoded. The peer's *role*
comes from its certificate: OU=node in the subject is a node, anything else a client, and
a client calling one of the server's ``node_only_methods`` is refused (FORBIDDEN) before the
handler runs. Host names are not checked: nodes are addressed by IP:port and register their
own addresses; trust rests on the CA alone (keep it private to the cluster). Under TLS,
timeouts are Python ones (``settimeout``): kernel ones (SO_RCVTIMEO) do not bound a TLS read.
Servers send no session tickets, which would make an idle client socket poll as readable
and fool the client's dead-connection check. A peer's *identity* is its certificate's SHA-256
fingerprint (tls.certificate_identity): a handler reads its caller's with ``peer_identity()``
(set once per connection, nothing per request; None without TLS), and a Connection can
require the node it dials to show a given one (``expected_identity``).

A shared cluster secret (optional, secret.py) makes a connection a node's without TLS: once
per connection the caller answers a challenge with an HMAC-SHA256 of the server's nonce
(``auth_challenge``, ``authenticate``), nothing is added per request; a node given a secret
refuses the node-only methods (FORBIDDEN) on a connection that has not authenticated.

Errors are mapped here, in one place:
- a handler's :class:`~kvstore.errors.KVError` goes out as a TApplicationException
  whose ``type`` is the error code (so a seed-only client sees an error);
- on the client side that exception comes back as the same KVError class;
- a failure to connect is a definite :class:`ConnectError` (nothing was sent);
  any failure after sending is an indefinite :class:`ConnectionLostError`.
"""

from kvstore.rpc.client import (
    CHECK_AFTER_IDLE_S,
    REOPEN_AFTER_IDLE_S,
    Connection,
    parse_address,
    probe,
    takes_connections,
)
from kvstore.rpc.framecheck import (
    MAX_ELEMENTS,
    MAX_NESTING,
    MalformedFrameError,
    MalformedRequestError,
    check_request,
)
from kvstore.rpc.secret import CONNECTION_METHODS, load_cluster_secret
from kvstore.rpc.server import (
    DEFAULT_FRAME_DEADLINE_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    REPLICATION_METHOD,
    RpcServer,
    _configure_connection,
    _FrameReader,
    peer_identity,
)
from kvstore.rpc.tls import (
    NODE_UNIT,
    certificate_identity,
    client_tls_context,
    is_node_certificate,
    own_identity,
    server_tls_context,
    short_identity,
)

__all__ = [
    "CHECK_AFTER_IDLE_S",
    "CONNECTION_METHODS",
    "DEFAULT_FRAME_DEADLINE_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_ELEMENTS",
    "MAX_NESTING",
    "NODE_UNIT",
    "REOPEN_AFTER_IDLE_S",
    "REPLICATION_METHOD",
    "Connection",
    "MalformedFrameError",
    "MalformedRequestError",
    "RpcServer",
    "_FrameReader",
    "_configure_connection",
    "certificate_identity",
    "check_request",
    "client_tls_context",
    "is_node_certificate",
    "load_cluster_secret",
    "own_identity",
    "parse_address",
    "peer_identity",
    "probe",
    "server_tls_context",
    "short_identity",
    "takes_connections",
]
