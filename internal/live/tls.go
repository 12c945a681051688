package live

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLSFiles name the PEM files of the page server's TLS: its certificate
// and key (the source), and the CA that signed it (the clients). The
// snapshot's token still authorizes every call; TLS keeps the memory and
// the token private on the wire.
type TLSFiles struct {
	Cert, Key, CA string
}

// Server is the page server's TLS config; nil without a certificate.
func (f TLSFiles) Server() (*tls.Config, error) {
	if f.Cert == "" && f.Key == "" {
		return nil, nil
	}
	if f.Cert == "" || f.Key == "" {
		return nil, errors.New("page-server TLS: give both the certificate and the key")
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("page-server TLS: load %s and %s: %w", f.Cert, f.Key, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}, nil
}

// Client is the clients' TLS config, trusting only the CA; nil without
// one.
func (f TLSFiles) Client() (*tls.Config, error) {
	if f.CA == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("page-server TLS: read CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("page-server TLS: no certificate in %s", f.CA)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, nil
}

// clientTLS checks an image's endpoint against the client's TLS config.
func clientTLS(endpointTLS bool, endpoint string, cfg *tls.Config) (*tls.Config, error) {
	if !endpointTLS {
		return nil, nil
	}
	if cfg == nil {
		return nil, fmt.Errorf("page server %s speaks TLS: give the CA that signed its certificate", endpoint)
	}
	return cfg, nil
}
