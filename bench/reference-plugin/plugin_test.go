package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	kmsapi "k8s.io/kms/apis/v2"
	"k8s.io/kms/pkg/service"
)

// serve starts the plugin behind the upstream gRPC service on a temporary socket and
// returns a client of it; both stop when the test ends.
func serve(t *testing.T, key []byte) kmsapi.KeyManagementServiceClient {
	t.Helper()
	plugin, err := newAESPlugin(key)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "refplugin") // t.TempDir can exceed the socket path limit
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "kms.sock")
	svc := service.NewGRPCService(socket, 5*time.Second, plugin)
	served := make(chan error, 1)
	go func() { served <- svc.ListenAndServe() }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the socket did not appear")
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		svc.Shutdown()
		if err := <-served; err != nil {
			t.Errorf("ListenAndServe: %v", err)
		}
		os.RemoveAll(dir)
	})
	return kmsapi.NewKeyManagementServiceClient(conn)
}

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

func TestRoundTripOverSocket(t *testing.T) {
	c := serve(t, testKey(1))
	ctx := context.Background()
	st, err := c.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != "v2" || st.Healthz != "ok" || st.KeyId != keyIDFor(testKey(1)) {
		t.Fatalf("unexpected status %+v", st)
	}
	seed := bytes.Repeat([]byte{7}, 32)
	enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "u1"})
	if err != nil {
		t.Fatal(err)
	}
	if enc.KeyId != st.KeyId || len(enc.Ciphertext) != 1+12+32+16 || bytes.Contains(enc.Ciphertext, seed) {
		t.Fatalf("unexpected encrypt response: key id %q, %d bytes", enc.KeyId, len(enc.Ciphertext))
	}
	again, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "u2"})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(again.Ciphertext, enc.Ciphertext) {
		t.Fatal("two encryptions gave the same ciphertext (nonce reuse)")
	}
	dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "u3"})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dec.Plaintext, seed) {
		t.Fatal("decrypt did not return the plaintext")
	}
}

func TestRejectsBadInput(t *testing.T) {
	c := serve(t, testKey(2))
	ctx := context.Background()
	enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: testKey(9), Uid: "u"})
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Clone(enc.Ciphertext)
	tampered[len(tampered)-1] ^= 1
	other, err := newAESPlugin(testKey(3))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		req  *kmsapi.DecryptRequest
		want codes.Code
	}{
		{"tampered", &kmsapi.DecryptRequest{Ciphertext: tampered, KeyId: enc.KeyId}, codes.InvalidArgument},
		{"truncated", &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext[:20], KeyId: enc.KeyId}, codes.InvalidArgument},
		{"empty", &kmsapi.DecryptRequest{KeyId: enc.KeyId}, codes.InvalidArgument},
		{"other key id", &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: other.keyID}, codes.NotFound},
	}
	for _, tc := range cases {
		_, err := c.Decrypt(ctx, tc.req)
		if status.Code(err) != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	for _, n := range []int{0, maxPlaintext + 1} {
		_, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, n)})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("encrypt of %d bytes: got %v, want InvalidArgument", n, err)
		}
	}
}

func TestLoadKey(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	if err := os.WriteFile(short, []byte("too short"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadKey(short); err == nil {
		t.Error("a 9-byte key file was accepted")
	}
	if _, err := loadKey(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing key file was accepted")
	}
	a, err := loadKey("")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := loadKey("")
	if len(a) != 32 || bytes.Equal(a, b) {
		t.Error("generated keys are not 32 random bytes")
	}
}

func TestRemoveStaleSocket(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := removeStaleSocket(file); err == nil {
		t.Error("a regular file was accepted as a stale socket")
	}
	if err := removeStaleSocket(filepath.Join(dir, "absent")); err != nil {
		t.Errorf("absent socket: %v", err)
	}
}
