package main

import (
	"context"
	"crypto/cipher"
	"crypto/rand"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"k8s.io/kms/pkg/service"
)

// formatV1 is the first byte of every ciphertext, so the format could evolve.
const formatV1 = 0x01

// maxPlaintext bounds Encrypt's input: kube-apiserver sends a 32-byte DEK seed, and the
// KMS v2 contract limits the ciphertext to 1 KiB.
const maxPlaintext = 512

// aesPlugin implements service.Service: Encrypt seals the plaintext with AES-256-GCM under
// one key, with a random 96-bit nonce and the key id as associated data, as
// formatV1 || nonce || ciphertext+tag. One key means no rotation, so Status is constant.
type aesPlugin struct {
	aead  cipher.AEAD
	keyID string
}

func (p *aesPlugin) Encrypt(_ context.Context, _ string, plaintext []byte) (*service.EncryptResponse, error) {
	if len(plaintext) == 0 || len(plaintext) > maxPlaintext {
		return nil, status.Errorf(codes.InvalidArgument, "plaintext must be 1 to %d bytes", maxPlaintext)
	}
	nonceSize := p.aead.NonceSize()
	out := make([]byte, 1+nonceSize, 1+nonceSize+len(plaintext)+p.aead.Overhead())
	out[0] = formatV1
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, status.Error(codes.Internal, "failed to generate a nonce")
	}
	out = p.aead.Seal(out, out[1:], plaintext, []byte(p.keyID))
	return &service.EncryptResponse{Ciphertext: out, KeyID: p.keyID}, nil
}

func (p *aesPlugin) Decrypt(_ context.Context, _ string, req *service.DecryptRequest) ([]byte, error) {
	if req.KeyID != p.keyID {
		return nil, status.Errorf(codes.NotFound, "unknown key id %q", req.KeyID)
	}
	nonceSize := p.aead.NonceSize()
	c := req.Ciphertext
	if len(c) < 1+nonceSize+p.aead.Overhead() || c[0] != formatV1 {
		return nil, status.Error(codes.InvalidArgument, "decryption failed")
	}
	plaintext, err := p.aead.Open(nil, c[1:1+nonceSize], c[1+nonceSize:], []byte(p.keyID))
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "decryption failed")
	}
	return plaintext, nil
}

func (p *aesPlugin) Status(context.Context) (*service.StatusResponse, error) {
	return &service.StatusResponse{Version: "v2", Healthz: "ok", KeyID: p.keyID}, nil
}
