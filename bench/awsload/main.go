// awsload: Encrypt and GenerateDataKey over an AWS KMS API, with the AWS SDK for Go v2 —
// SigV4 signing and all — at a given number of concurrent callers: calls/s, p50 and p99
// for `make bench`, the same client against kubekms's AWS API and against local-kms.
// Credentials, region and CA bundle come from the environment (AWS_ROLE_ARN and
// AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ENDPOINT_URL_STS for kubekms: STS with a
// ServiceAccount token; static keys for local-kms). Every answer is checked.
//
//	awsload --endpoint URL (--key KEY | --create-key) --calls N --concurrency 1,16 --target NAME --json OUT
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
)

// Row is one measurement, in the shape of `kubekms bench keyapi --json`.
type Row struct {
	Target         string  `json:"target"`
	Operation      string  `json:"operation"`
	Concurrency    int     `json:"concurrency"`
	Calls          int     `json:"calls"`
	CallsPerSecond float64 `json:"calls_per_second"`
	P50Micros      float64 `json:"p50_us"`
	P99Micros      float64 `json:"p99_us"`
}

func percentile(sorted []time.Duration, p float64) float64 {
	i := int(float64(len(sorted)-1) * p)
	return float64(sorted[i].Nanoseconds()) / 1e3
}

// measure runs `calls` calls of `call` split among `n` callers, after a warm-up of one
// call per caller.
func measure(n, calls int, call func() error) (Row, error) {
	per := (calls + n - 1) / n
	latencies := make([][]time.Duration, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		if err := call(); err != nil {
			return Row{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	start := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < per; j++ {
				t := time.Now()
				if err := call(); err != nil {
					errs[i] = err
					return
				}
				latencies[i] = append(latencies[i], time.Since(t))
			}
		}(i)
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	for i := range latencies {
		if errs[i] != nil {
			return Row{}, errs[i]
		}
		all = append(all, latencies[i]...)
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	return Row{
		Concurrency:    n,
		Calls:          len(all),
		CallsPerSecond: float64(len(all)) / elapsed.Seconds(),
		P50Micros:      percentile(all, 0.50),
		P99Micros:      percentile(all, 0.99),
	}, nil
}

func run() error {
	endpoint := flag.String("endpoint", "", "the KMS endpoint (https://… or http://…)")
	key := flag.String("key", "", "the key to use (ARN, keyId or alias)")
	createKey := flag.Bool("create-key", false, "create a symmetric key first and use it")
	calls := flag.Int("calls", 1000, "calls per measurement")
	concurrency := flag.String("concurrency", "1,16", "comma-separated caller counts")
	target := flag.String("target", "aws", "the name the rows carry")
	out := flag.String("json", "", "where to write the rows")
	flag.Parse()
	if *endpoint == "" || (*key == "") == !*createKey || *out == "" || *calls < 1 {
		return fmt.Errorf("need --endpoint, one of --key and --create-key, --calls >= 1 and --json")
	}
	ctx := context.Background()
	httpClient := awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
		t.MaxIdleConns = 256
		t.MaxIdleConnsPerHost = 256
	})
	cfg, err := config.LoadDefaultConfig(ctx, config.WithHTTPClient(httpClient))
	if err != nil {
		return fmt.Errorf("load the AWS configuration: %w", err)
	}
	client := kms.NewFromConfig(cfg, func(o *kms.Options) {
		o.BaseEndpoint = aws.String(*endpoint)
		o.RetryMaxAttempts = 1
	})
	keyID := *key
	if *createKey {
		made, err := client.CreateKey(ctx, &kms.CreateKeyInput{Description: aws.String("awsload")})
		if err != nil {
			return fmt.Errorf("CreateKey: %w", err)
		}
		keyID = aws.ToString(made.KeyMetadata.Arn)
	}
	plaintext := make([]byte, 32)
	ops := []struct {
		name string
		call func() error
	}{
		{"Encrypt", func() error {
			r, err := client.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(keyID), Plaintext: plaintext})
			if err == nil && len(r.CiphertextBlob) == 0 {
				err = fmt.Errorf("Encrypt returned no ciphertext")
			}
			return err
		}},
		{"GenerateDataKey", func() error {
			r, err := client.GenerateDataKey(ctx, &kms.GenerateDataKeyInput{KeyId: aws.String(keyID), KeySpec: types.DataKeySpecAes256})
			if err == nil && (len(r.Plaintext) != 32 || len(r.CiphertextBlob) == 0) {
				err = fmt.Errorf("GenerateDataKey returned a %d-byte data key", len(r.Plaintext))
			}
			return err
		}},
	}
	var rows []Row
	for _, op := range ops {
		for _, field := range strings.Split(*concurrency, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(field))
			if err != nil || n < 1 {
				return fmt.Errorf("bad --concurrency %q", *concurrency)
			}
			row, err := measure(n, *calls, op.call)
			if err != nil {
				return fmt.Errorf("%s at %d callers: %w", op.name, n, err)
			}
			row.Target, row.Operation = *target, op.name
			rows = append(rows, row)
		}
	}
	data, err := json.MarshalIndent(rows, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(*out, data, 0o644)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "awsload:", err)
		os.Exit(1)
	}
}
