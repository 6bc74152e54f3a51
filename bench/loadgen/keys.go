package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// keysResult is what `loadgen keys` prints.
type keysResult struct {
	Keys int `json:"keys"`
	// Create is the client's POSTs of the KmsKeys.
	Create opStats `json:"create"`
	// EnabledSeconds runs from the first POST until the last key was seen Enabled.
	EnabledSeconds float64 `json:"enabled_seconds"`
	// RotatePatch is the client's PATCHes of spec.rotation.onDemandRequest.
	RotatePatch opStats `json:"rotate_patch"`
	// RotatedSeconds runs from the first PATCH until the last key was seen at version 2
	// with that request handled.
	RotatedSeconds float64 `json:"rotated_seconds"`
}

func keysPath(namespace string) string {
	return "/apis/kms.kubekms.io/v1alpha1/namespaces/" + namespace + "/kmskeys"
}

// keysBench creates `count` KmsKeys labelled `label`, waits until the controller has
// enabled them all, requests one rotation of each and waits until every key has rotated.
func keysBench(ctx context.Context, c *client, namespace string, count int, label string, concurrency int) (*keysResult, error) {
	labelKey, labelValue, ok := strings.Cut(label, "=")
	if !ok || labelKey == "" || labelValue == "" {
		return nil, fmt.Errorf("--label %q is not KEY=VALUE", label)
	}
	if err := c.ensureNamespace(ctx, namespace); err != nil {
		return nil, err
	}
	t := newTracker()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	watchErr := make(chan error, 1)
	go func() { watchErr <- t.run(watchCtx, c, namespace, label) }()
	if err := t.waitSynced(ctx); err != nil {
		return nil, err
	}
	if n := t.count(func(keyStatus) bool { return true }); n > 0 {
		return nil, fmt.Errorf("%d KmsKeys labelled %s already exist in %s; use a new label value", n, label, namespace)
	}

	res := keysResult{Keys: count}
	var err error
	started := time.Now()
	res.Create, err = measureEach(ctx, count, concurrency, func(ctx context.Context, i int) error {
		body, err := json.Marshal(map[string]any{
			"apiVersion": "kms.kubekms.io/v1alpha1",
			"kind":       "KmsKey",
			"metadata":   map[string]any{"name": fmt.Sprintf("k-%05d", i), "labels": map[string]string{labelKey: labelValue}},
			"spec":       map[string]any{"description": "kubekms benchmark key"},
		})
		if err != nil {
			return err
		}
		_, err = c.do(ctx, http.MethodPost, keysPath(namespace), "application/json", body, http.StatusCreated)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create: %w", err)
	}
	if err := t.waitFor(ctx, count, "Enabled", func(k keyStatus) bool { return k.State == "Enabled" }); err != nil {
		return nil, err
	}
	res.EnabledSeconds = time.Since(started).Seconds()

	request := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	patch := []byte(fmt.Sprintf(`{"spec":{"rotation":{"onDemandRequest":%q}}}`, request))
	started = time.Now()
	res.RotatePatch, err = measureEach(ctx, count, concurrency, func(ctx context.Context, i int) error {
		_, err := c.do(ctx, http.MethodPatch, fmt.Sprintf("%s/k-%05d", keysPath(namespace), i),
			"application/merge-patch+json", patch, http.StatusOK)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("rotate: %w", err)
	}
	rotated := func(k keyStatus) bool {
		return k.State == "Enabled" && k.CurrentVersion == 2 && k.LastOnDemandRequest == request
	}
	if err := t.waitFor(ctx, count, "rotated to version 2", rotated); err != nil {
		return nil, err
	}
	res.RotatedSeconds = time.Since(started).Seconds()
	stopWatch()
	if err := <-watchErr; err != nil && ctx.Err() == nil && err != context.Canceled {
		return nil, err
	}
	return &res, nil
}

// keyStatus is the part of a KmsKey the benchmark follows.
type keyStatus struct {
	State               string `json:"state"`
	CurrentVersion      int    `json:"currentVersion"`
	LastOnDemandRequest string `json:"lastOnDemandRequest"`
}

type keyObject struct {
	Metadata struct {
		Name            string `json:"name"`
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	Status keyStatus `json:"status"`
}

// tracker follows the status of the labelled KmsKeys with a list and a watch (re-listing
// whenever the watch ends), so waiting costs the API server one stream, not polls.
type tracker struct {
	mu      sync.Mutex
	keys    map[string]keyStatus
	synced  bool
	changed chan struct{} // closed and replaced on every change
}

func newTracker() *tracker {
	return &tracker{keys: map[string]keyStatus{}, changed: make(chan struct{})}
}

func (t *tracker) update(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f()
	close(t.changed)
	t.changed = make(chan struct{})
}

func (t *tracker) count(pred func(keyStatus) bool) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, k := range t.keys {
		if pred(k) {
			n++
		}
	}
	return n
}

// wait blocks until cond holds (checked under the lock after every change).
func (t *tracker) wait(ctx context.Context, cond func() bool) error {
	for {
		t.mu.Lock()
		ok, changed := cond(), t.changed
		t.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (t *tracker) waitSynced(ctx context.Context) error {
	return t.wait(ctx, func() bool { return t.synced })
}

// waitFor blocks until n keys satisfy pred; on timeout it says how many did.
func (t *tracker) waitFor(ctx context.Context, n int, what string, pred func(keyStatus) bool) error {
	err := t.wait(ctx, func() bool {
		got := 0
		for _, k := range t.keys {
			if pred(k) {
				got++
			}
		}
		return got >= n
	})
	if err != nil {
		return fmt.Errorf("waiting for %d KmsKeys to be %s: only %d are (%w)", n, what, t.count(pred), err)
	}
	return nil
}

// run lists and watches the keys until ctx ends.
func (t *tracker) run(ctx context.Context, c *client, namespace, selector string) error {
	for ctx.Err() == nil {
		body, err := c.do(ctx, http.MethodGet, keysPath(namespace)+"?labelSelector="+url.QueryEscape(selector), "", nil, http.StatusOK)
		if err != nil {
			return err
		}
		var list struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
			} `json:"metadata"`
			Items []keyObject `json:"items"`
		}
		if err := json.Unmarshal(body, &list); err != nil {
			return fmt.Errorf("failed to parse the KmsKey list: %w", err)
		}
		t.update(func() {
			t.keys = map[string]keyStatus{}
			for _, k := range list.Items {
				t.keys[k.Metadata.Name] = k.Status
			}
			t.synced = true
		})
		if err := t.watch(ctx, c, namespace, selector, list.Metadata.ResourceVersion); err != nil && ctx.Err() == nil {
			// A watch can end for ordinary reasons (timeout, a compacted resource
			// version); list again after a short pause.
			time.Sleep(200 * time.Millisecond)
		}
	}
	return ctx.Err()
}

// watch applies watch events from resourceVersion until the stream ends.
func (t *tracker) watch(ctx context.Context, c *client, namespace, selector, resourceVersion string) error {
	q := url.Values{
		"watch":               {"true"},
		"labelSelector":       {selector},
		"resourceVersion":     {resourceVersion},
		"allowWatchBookmarks": {"true"},
		"timeoutSeconds":      {"300"},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+keysPath(namespace)+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("watch: HTTP %d", resp.StatusCode)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev struct {
			Type   string    `json:"type"`
			Object keyObject `json:"object"`
		}
		if err := dec.Decode(&ev); err != nil {
			return err
		}
		switch ev.Type {
		case "ADDED", "MODIFIED":
			t.update(func() { t.keys[ev.Object.Metadata.Name] = ev.Object.Status })
		case "DELETED":
			t.update(func() { delete(t.keys, ev.Object.Metadata.Name) })
		case "ERROR":
			return fmt.Errorf("watch error event")
		}
	}
}

// deleteResult is what `loadgen delete-keys` prints.
type deleteResult struct {
	Deleted int `json:"deleted"`
}

// deleteKeys removes the labelled KmsKeys and their KmsKeyMaterial behind the controller's
// back (it must be stopped), so that the next measurement starts from the same state. It
// is the benchmark's cleanup, not a way to delete keys: it destroys their material at once.
func deleteKeys(ctx context.Context, c *client, namespace, label string, concurrency int) (*deleteResult, error) {
	if _, _, ok := strings.Cut(label, "="); !ok {
		return nil, fmt.Errorf("--label %q is not KEY=VALUE", label)
	}
	body, err := c.do(ctx, http.MethodGet, keysPath(namespace)+"?labelSelector="+url.QueryEscape(label), "", nil, http.StatusOK)
	if err != nil {
		return nil, err
	}
	var list struct {
		Items []struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
			Status struct {
				KeyID string `json:"keyId"`
			} `json:"status"`
		} `json:"items"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("failed to parse the KmsKey list: %w", err)
	}
	ignoreNotFound := func(err error) error {
		if e, ok := err.(*apiError); ok && e.code == http.StatusNotFound {
			return nil
		}
		return err
	}
	_, err = measureEach(ctx, len(list.Items), concurrency, func(ctx context.Context, i int) error {
		k := list.Items[i]
		if k.Status.KeyID != "" {
			_, err := c.do(ctx, http.MethodDelete, "/apis/kms.kubekms.io/v1alpha1/kmskeymaterials/"+k.Status.KeyID, "", nil, http.StatusOK)
			if err := ignoreNotFound(err); err != nil {
				return err
			}
		}
		path := keysPath(namespace) + "/" + k.Metadata.Name
		_, err := c.do(ctx, http.MethodPatch, path, "application/merge-patch+json", []byte(`{"metadata":{"finalizers":null}}`), http.StatusOK)
		if err := ignoreNotFound(err); err != nil {
			return err
		}
		_, err = c.do(ctx, http.MethodDelete, path, "", nil, http.StatusOK)
		return ignoreNotFound(err)
	})
	if err != nil {
		return nil, fmt.Errorf("delete: %w", err)
	}
	return &deleteResult{Deleted: len(list.Items)}, nil
}
