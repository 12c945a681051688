// Package transport serves a live snapshot's memory to restoring clients: a
// ttrpc page service (server and client) with token and TLS authentication.
//
// # Protocol
//
// The wire contract is pagesvc/v1/pages.proto (versioned protobuf over
// github.com/containerd/ttrpc; field numbers are pinned there). A session is:
//
//	Open(token, protocol_version, client_id) → snapshot id, processes
//	GetPages / StreamPages …                  (any number, concurrently)
//	Done(client_id, process)                   once per process fully fetched
//	Close(client_id) → ack                     ends the session
//
// Release(token) may come at any time from any client holding the token: the
// server stops serving pages and the source frees the snapshot.
//
// Every request carries the snapshot token; the server compares it in
// constant time and answers PermissionDenied on a mismatch, which the client
// reports as ErrBadToken. Status codes map to this package's error kinds:
//
//	PermissionDenied             ErrBadToken
//	InvalidArgument, OutOfRange  ErrBadRequest
//	Unavailable                  ErrClosed   (server shut down or snapshot released)
//	Unimplemented                ErrVersion  (protocol version or method unknown)
//
// On a unix socket Client.Stream and Client.StreamHeld use the bulk
// protocol instead of StreamPages (bulk.go): a separate connection that
// starts with a magic the server tells apart from ttrpc, carries
// StreamPagesRequest messages (token checked on each) and small frames
// naming slots of a sealed memfd ring the server shares with the client;
// the page data itself crosses no socket.
//
// Limits: every range is page aligned and non-empty. One GetPages answer
// carries at most MaxGetPagesBytes (a ttrpc message is at most 4 MiB); the
// client splits larger reads into requests of at most ClientRequestBytes
// with up to ClientRequestsInFlight in flight. StreamPages sends chunks of
// at most the requested chunk size (DefaultChunkSize, at most MaxChunkSize),
// in range order, each inside one range.
//
// # Flow control
//
// ttrpc has no flow control for server streams: the client's connection
// reader parks each message in a per-stream queue of 64 entries and, when a
// queue stays full for a second, kills the stream (and meanwhile stalls every
// other call on the connection). Client.Stream therefore asks for at most
// streamWindowChunks chunks and streamWindowBytes bytes per StreamPages call;
// it splits the ranges into such windows and keeps streamWindowsInFlight
// windows requested, the one it consumes and the ones the server fills
// meanwhile. That bounds the client's queued data. A window Stream gives up
// on (error, cancelled context) is drained in the background, since ttrpc
// cannot cancel a stream.
//
// Streams run on a second connection, dialled on the first Stream. The
// server writes a connection's messages one after the other, so a fault's
// GetPages answer sharing the fill's connection queued behind megabyte
// chunks: milliseconds instead of tens of microseconds
// (BenchmarkGetPages/4KiB-during-stream).
//
// # Copies
//
// Over the bulk protocol (unix sockets) the server reads pages straight into
// a ring slot and the client reads them from its mapping of that slot: one
// copy per byte in all, and StreamHeld lets the caller keep the slot (e.g.
// to UFFDIO_COPY from it) instead of copying it out.
//
// Over ttrpc, page data is copied as little as ttrpc allows (codec.go): the server reads
// pages straight into the buffer it sends and reuses it once ttrpc has
// written it; the client decodes straight into its own buffer (Stream) or the
// caller's (GetPages). What remains per byte of a stream is the source's
// read, the kernel's two socket copies and one copy out of ttrpc's receive
// buffer.
//
// # Locks
//
// Server: gate (readers: page reads; writer: release) is never held while
// taking mu; mu guards sessions and connections and is held only for map
// updates. Client: no locks beyond ttrpc's own.
package transport
