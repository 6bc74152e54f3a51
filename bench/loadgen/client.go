package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

// client sends requests to kube-apiserver as the holder of a client certificate, over
// one multiplexed HTTP/2 connection.
type client struct {
	base string
	http *http.Client
}

func newClient(server, caFile, certFile, keyFile string) (*client, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("failed to read the CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s holds no PEM certificate", caFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("failed to load the client certificate: %w", err)
	}
	transport := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
		ForceAttemptHTTP2: true,
	}
	return &client{base: strings.TrimSuffix(server, "/"), http: &http.Client{Transport: transport}}, nil
}

// apiError is a response with an unexpected status code.
type apiError struct {
	method, path string
	code         int
	body         string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("%s %s: HTTP %d: %s", e.method, e.path, e.code, e.body)
}

// do sends one request and reads the whole response; any status other than want is an
// *apiError.
func (c *client) do(ctx context.Context, method, path, contentType string, body []byte, want int) ([]byte, error) {
	var reader io.Reader
	if body != nil {
		reader = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, reader)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: failed to read the response: %w", method, path, err)
	}
	if resp.StatusCode != want {
		msg := string(data)
		if len(msg) > 300 {
			msg = msg[:300] + "…"
		}
		return nil, &apiError{method, path, resp.StatusCode, msg}
	}
	return data, nil
}

// ensureNamespace creates the namespace unless it exists.
func (c *client) ensureNamespace(ctx context.Context, name string) error {
	body := fmt.Sprintf(`{"apiVersion":"v1","kind":"Namespace","metadata":{"name":%q}}`, name)
	_, err := c.do(ctx, http.MethodPost, "/api/v1/namespaces", "application/json", []byte(body), http.StatusCreated)
	if e, ok := err.(*apiError); ok && e.code == http.StatusConflict {
		return nil
	}
	return err
}
