package conveyor

import (
	"context"
	"os"

	"google.golang.org/grpc"
)

// DefaultAddress is CONVEYOR_ADDRESS, or 127.0.0.1:50051 when unset.
func DefaultAddress() string {
	if address := os.Getenv("CONVEYOR_ADDRESS"); address != "" {
		return address
	}
	return "127.0.0.1:50051"
}

// ConnOptions say how to reach the server; the zero value means DefaultAddress, no TLS and
// CONVEYOR_TOKEN (if set) as the bearer token.
type ConnOptions struct {
	// host:port; DefaultAddress() when empty.
	Address string
	// Bearer token sent as `authorization: Bearer <token>`; CONVEYOR_TOKEN when empty.
	Token string
	// Extra dial options, e.g. grpc.WithTransportCredentials for TLS (insecure by default).
	DialOptions []grpc.DialOption
}

func (o ConnOptions) dial(ctx context.Context, defaults ...grpc.DialOption) (*grpc.ClientConn, error) {
	address := o.Address
	if address == "" {
		address = DefaultAddress()
	}
	token := o.Token
	if token == "" {
		token = os.Getenv("CONVEYOR_TOKEN")
	}
	opts := append([]grpc.DialOption{grpc.WithInsecure()}, defaults...)
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(token)))
	}
	opts = append(opts, o.DialOptions...) // later options win (TLS credentials replace insecure)
	return grpc.DialContext(ctx, address, opts...)
}

// bearer sends the token on every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: tokens also work on plaintext loopback servers.
func (bearer) RequireTransportSecurity() bool { return false }
