package main

import (
	"context"
	"math"
	"sort"
	"sync"
	"time"
)

// opStats summarises one kind of request: how many, how long they took in all (wall
// clock), the resulting rate, and the latency percentiles of single requests.
type opStats struct {
	Count     int     `json:"count"`
	Seconds   float64 `json:"seconds"`
	PerSecond float64 `json:"per_second"`
	P50Ms     float64 `json:"p50_ms"`
	P99Ms     float64 `json:"p99_ms"`
}

func summarise(latencies []time.Duration, wall time.Duration) opStats {
	sorted := append([]time.Duration(nil), latencies...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	pct := func(p float64) float64 {
		if len(sorted) == 0 {
			return 0
		}
		i := int(math.Round(float64(len(sorted)-1) * p))
		return float64(sorted[i].Microseconds()) / 1000
	}
	return opStats{
		Count:     len(sorted),
		Seconds:   wall.Seconds(),
		PerSecond: float64(len(sorted)) / wall.Seconds(),
		P50Ms:     pct(0.50),
		P99Ms:     pct(0.99),
	}
}

// measureEach calls op(i) for i in [0, n) from `workers` goroutines and returns the
// statistics; the first error cancels the rest and is returned.
func measureEach(ctx context.Context, n, workers int, op func(ctx context.Context, i int) error) (opStats, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	latencies := make([]time.Duration, n)
	next := make(chan int)
	var (
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)
	started := time.Now()
	for w := 0; w < min(workers, n); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				t := time.Now()
				if err := op(ctx, i); err != nil {
					once.Do(func() { firstErr = err; cancel() })
					continue
				}
				latencies[i] = time.Since(t)
			}
		}()
	}
feed:
	for i := 0; i < n; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	wall := time.Since(started)
	if firstErr != nil {
		return opStats{}, firstErr
	}
	if err := ctx.Err(); err != nil {
		return opStats{}, err
	}
	return summarise(latencies, wall), nil
}
