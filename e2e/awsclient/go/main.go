// kubekms-awsclient: the AWS SDK for Go v2 against kubekms's AWS API, configured only by
// the environment a pod has (AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE,
// AWS_ENDPOINT_URL_STS, AWS_ENDPOINT_URL_KMS, AWS_CA_BUNDLE, AWS_REGION), so its
// credentials come from STS AssumeRoleWithWebIdentity with a ServiceAccount token.
//
//	kubekms-awsclient roundtrip KEY_ARN   encrypt, decrypt, data keys, describe: one JSON object
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"
)

func code(err error) string {
	var api smithy.APIError
	if errors.As(err, &api) {
		return api.ErrorCode()
	}
	return err.Error()
}

func roundtrip(ctx context.Context, client *kms.Client, arn string) (map[string]any, error) {
	out := map[string]any{}
	ec := map[string]string{"sdk": "go"}
	enc, err := client.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(arn), Plaintext: []byte("hello from Go"), EncryptionContext: ec})
	if err != nil {
		return nil, fmt.Errorf("Encrypt: %w", err)
	}
	out["encrypt_key_id"] = aws.ToString(enc.KeyId)
	dec, err := client.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: enc.CiphertextBlob, EncryptionContext: ec})
	if err != nil {
		return nil, fmt.Errorf("Decrypt: %w", err)
	}
	out["decrypt_plaintext"] = string(dec.Plaintext)
	gdk, err := client.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: aws.String(arn), KeySpec: types.DataKeySpecAes256})
	if err != nil {
		return nil, fmt.Errorf("GenerateDataKey: %w", err)
	}
	out["data_key_len"] = len(gdk.Plaintext)
	desc, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(arn)})
	if err != nil {
		return nil, fmt.Errorf("DescribeKey: %w", err)
	}
	out["key_state"] = string(desc.KeyMetadata.KeyState)
	out["creation_date_set"] = desc.KeyMetadata.CreationDate != nil && !desc.KeyMetadata.CreationDate.IsZero()
	_, err = client.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: enc.CiphertextBlob, EncryptionContext: map[string]string{"sdk": "other"}})
	out["wrong_context"] = code(err)
	return out, nil
}

func main() {
	if len(os.Args) != 3 || os.Args[1] != "roundtrip" {
		fmt.Fprintln(os.Stderr, "usage: kubekms-awsclient roundtrip KEY_ARN")
		os.Exit(2)
	}
	ctx := context.Background()
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "config:", err)
		os.Exit(1)
	}
	cfg.RetryMaxAttempts = 1
	out, err := roundtrip(ctx, kms.NewFromConfig(cfg), os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
