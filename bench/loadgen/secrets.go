package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

// secretsResult is what `loadgen secrets` prints.
type secretsResult struct {
	Create opStats `json:"create"`
	Get    opStats `json:"get"`
	List   opStats `json:"list"`
}

func secretName(i int) string { return fmt.Sprintf("s-%05d", i) }

func secretsPath(namespace string) string { return "/api/v1/namespaces/" + namespace + "/secrets" }

// secretsBench creates `count` Secrets of `size` random bytes each, reads each back once,
// then lists them all `lists` times, one list at a time.
func secretsBench(ctx context.Context, c *client, namespace string, count, size, concurrency, lists int) (*secretsResult, error) {
	if err := c.ensureNamespace(ctx, namespace); err != nil {
		return nil, err
	}
	base := secretsPath(namespace)
	var res secretsResult
	var err error

	// The request bodies are made before the clock starts: random data, so nothing compresses.
	bodies := make([][]byte, count)
	for i := range bodies {
		data := make([]byte, size)
		if _, err := rand.Read(data); err != nil {
			return nil, err
		}
		bodies[i], err = json.Marshal(map[string]any{
			"apiVersion": "v1",
			"kind":       "Secret",
			"metadata":   map[string]string{"name": secretName(i)},
			"type":       "Opaque",
			"data":       map[string]string{"payload": base64.StdEncoding.EncodeToString(data)},
		})
		if err != nil {
			return nil, err
		}
	}
	res.Create, err = measureEach(ctx, count, concurrency, func(ctx context.Context, i int) error {
		_, err := c.do(ctx, http.MethodPost, base, "application/json", bodies[i], http.StatusCreated)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create: %w", err)
	}

	res.Get, err = measureEach(ctx, count, concurrency, func(ctx context.Context, i int) error {
		body, err := c.do(ctx, http.MethodGet, base+"/"+secretName(i), "", nil, http.StatusOK)
		if err != nil {
			return err
		}
		var s struct {
			Data map[string][]byte `json:"data"` // base64 in JSON, decoded by encoding/json
		}
		if err := json.Unmarshal(body, &s); err != nil {
			return fmt.Errorf("get %s: %w", secretName(i), err)
		}
		if got := len(s.Data["payload"]); got != size {
			return fmt.Errorf("get %s: payload of %d bytes, want %d", secretName(i), got, size)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("get: %w", err)
	}

	// Lists one after another; only the requests are timed, not the check of each list.
	var listLatencies []time.Duration
	var listWall time.Duration
	for range lists {
		took, err := listSecrets(ctx, c, namespace, count)
		if err != nil {
			return nil, fmt.Errorf("list: %w", err)
		}
		listLatencies = append(listLatencies, took)
		listWall += took
	}
	res.List = summarise(listLatencies, listWall)
	return &res, nil
}

// listSecrets lists every Secret of the namespace in one request and checks that there
// are `expect` of them. It returns how long the request took, body included; parsing for
// the check is not timed.
func listSecrets(ctx context.Context, c *client, namespace string, expect int) (time.Duration, error) {
	t := time.Now()
	body, err := c.do(ctx, http.MethodGet, secretsPath(namespace), "", nil, http.StatusOK)
	took := time.Since(t)
	if err != nil {
		return 0, err
	}
	var list struct {
		Items []struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		} `json:"items"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return 0, fmt.Errorf("failed to parse the list: %w", err)
	}
	if len(list.Items) != expect {
		return 0, fmt.Errorf("the list holds %d Secrets, want %d", len(list.Items), expect)
	}
	return took, nil
}

// coldListResult is what `loadgen list` prints.
type coldListResult struct {
	Seconds float64 `json:"seconds"`
	Items   int     `json:"items"`
}

// coldList times one full list (the first after a restart of kube-apiserver).
func coldList(ctx context.Context, c *client, namespace string, expect int) (*coldListResult, error) {
	took, err := listSecrets(ctx, c, namespace, expect)
	if err != nil {
		return nil, err
	}
	return &coldListResult{Seconds: took.Seconds(), Items: expect}, nil
}
