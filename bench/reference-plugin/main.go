// Command reference-plugin is the Go reference of `make bench`: a KMS v2 plugin built the
// way most existing plugins are, on the upstream service package k8s.io/kms/pkg/service,
// that wraps kube-apiserver's DEK seed with AES-256-GCM under one local 256-bit key. It
// talks to no remote KMS, so the benchmark compares stack against stack (Go, grpc-go and the
// upstream service wrapper against Rust, tonic and kubekms), not network against local.
//
// It is a benchmark reference, not a production plugin: one key, no rotation, no audit, no
// metrics. Usage:
//
//	reference-plugin --socket PATH [--key-file FILE]
//
// With --key-file the key is the file's 32 raw bytes; without it a random key is generated
// at start, so nothing encrypted before a restart can be decrypted after it.
package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/kms/pkg/service"
)

func main() {
	socket := flag.String("socket", "", "unix socket to serve KMS v2 on (required)")
	keyFile := flag.String("key-file", "", "file with the 32-byte AES-256 key; a random key when empty")
	timeout := flag.Duration("timeout", 10*time.Second, "connection timeout of the gRPC server")
	flag.Parse()
	if err := run(*socket, *keyFile, *timeout); err != nil {
		fmt.Fprintf(os.Stderr, "reference-plugin: %v\n", err)
		os.Exit(1)
	}
}

func run(socket, keyFile string, timeout time.Duration) error {
	if socket == "" {
		return errors.New("--socket is required")
	}
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	key, err := loadKey(keyFile)
	if err != nil {
		return err
	}
	plugin, err := newAESPlugin(key)
	if err != nil {
		return err
	}
	if err := removeStaleSocket(socket); err != nil {
		return err
	}
	// The socket is created by net.Listen inside ListenAndServe; owner-only, as kubekms's.
	syscall.Umask(0o077)
	grpcService := service.NewGRPCService(socket, timeout, plugin)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- grpcService.ListenAndServe() }()
	log.Printf("serving KMS v2 on %s with key id %s", socket, plugin.keyID)

	select {
	case err = <-served:
	case sig := <-stop:
		log.Printf("%v: shutting down", sig)
		grpcService.Shutdown()
		err = <-served
	}
	if rmErr := os.Remove(socket); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) {
		log.Printf("failed to remove %s: %v", socket, rmErr)
	}
	return err
}

// loadKey reads the key file, or generates a random key when path is empty.
func loadKey(path string) ([]byte, error) {
	if path == "" {
		key := make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, fmt.Errorf("failed to generate a key: %w", err)
		}
		return key, nil
	}
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("failed to read the key file: %w", err)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("the key file %s holds %d bytes, not 32", path, len(key))
	}
	return key, nil
}

// removeStaleSocket removes a socket left behind by a crashed plugin, and refuses to
// replace one that a live process still serves, or a file that is not a socket.
func removeStaleSocket(path string) error {
	info, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if info.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return fmt.Errorf("%s is served by another process", path)
	}
	return os.Remove(path)
}

// keyIDFor names a key without revealing it: a prefix of a domain-separated SHA-256.
func keyIDFor(key []byte) string {
	h := sha256.New()
	h.Write([]byte("kubekms-bench-reference-plugin/key-id\x00"))
	h.Write(key)
	return "reference:" + hex.EncodeToString(h.Sum(nil)[:16])
}

// Compile-time check that aesPlugin is what the upstream service package wraps.
var _ service.Service = (*aesPlugin)(nil)

func newAESPlugin(key []byte) (*aesPlugin, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("failed to create the cipher: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("failed to create the cipher: %w", err)
	}
	return &aesPlugin{aead: aead, keyID: keyIDFor(key)}, nil
}
