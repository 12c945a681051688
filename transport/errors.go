package transport

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error kinds, for errors.Is. The server converts them to status codes once,
// in toStatus; the client converts status codes back in fromStatus.
var (
	// ErrBadToken: the request's token does not match the snapshot's.
	ErrBadToken = errors.New("bad token")
	// ErrBadRequest: a malformed request: unaligned or empty range, unknown
	// process, range outside the snapshot, size over a limit, no session.
	ErrBadRequest = errors.New("bad request")
	// ErrClosed: the server is shut down, the snapshot released, or the
	// client closed.
	ErrClosed = errors.New("closed")
	// ErrVersion: the peers share no protocol version or method.
	ErrVersion = errors.New("unsupported protocol version")
	// ErrProtocol: the peer broke the protocol (e.g. a stream that skipped
	// or repeated pages, or a close without ack).
	ErrProtocol = errors.New("protocol violation")
	// ErrBadAddress: an address that ParseAddr does not understand.
	ErrBadAddress = errors.New("bad address")
)

// toStatus converts a handler error to the status the client sees. The
// message keeps the chain's text; the code carries the kind.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, ErrBadToken):
		code = codes.PermissionDenied
	case errors.Is(err, ErrBadRequest):
		code = codes.InvalidArgument
	case errors.Is(err, ErrClosed):
		code = codes.Unavailable
	case errors.Is(err, ErrVersion):
		code = codes.Unimplemented
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	return status.Error(code, err.Error())
}

// fromStatus converts an error returned by a ttrpc call to one carrying this
// package's kind, keeping the original (and its status) in the chain.
func fromStatus(op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, ttrpc.ErrClosed) {
		return fmt.Errorf("%s: %w (%w)", op, ErrClosed, err)
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%s: %w", op, err)
	}
	var kind error
	switch st.Code() {
	case codes.PermissionDenied:
		kind = ErrBadToken
	case codes.InvalidArgument, codes.OutOfRange, codes.ResourceExhausted:
		kind = ErrBadRequest
	case codes.Unavailable:
		kind = ErrClosed
	case codes.Unimplemented:
		kind = ErrVersion
	case codes.Canceled:
		kind = context.Canceled
	case codes.DeadlineExceeded:
		kind = context.DeadlineExceeded
	default:
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: %w (%w)", op, kind, err)
}
