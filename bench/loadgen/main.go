// Command loadgen is the API client of `make bench`: it drives kube-apiserver over its REST
// API with concurrent requests on one HTTP/2 connection (as client-go does), measures each
// request, and prints the result as JSON on standard output. It checks what it reads
// (every Secret's size, every list's length, every key's state) so that a broken setup
// fails the benchmark instead of producing numbers; it never judges speed.
//
//	loadgen secrets --namespace NS --count N --size BYTES --concurrency C --lists L  (create, get, list)
//	loadgen list --namespace NS --expect N                                           (one full list)
//	loadgen keys --namespace NS --count N --label KEY=VALUE --concurrency C          (KmsKeys: create, Enabled, rotate)
//	loadgen delete-keys --namespace NS --label KEY=VALUE                             (remove them and their material)
//
// Every command also takes --server URL --ca FILE --cert FILE --key FILE (an admin client
// certificate) and --timeout DURATION.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: %v\n", err)
		os.Exit(1)
	}
}

// connFlags are the flags every command shares.
type connFlags struct {
	server, ca, cert, key string
	timeout               time.Duration
}

func (c *connFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.server, "server", "", "kube-apiserver URL (required)")
	fs.StringVar(&c.ca, "ca", "", "CA certificate of the API server (required)")
	fs.StringVar(&c.cert, "cert", "", "client certificate (required)")
	fs.StringVar(&c.key, "key", "", "client key (required)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Minute, "give up after this long")
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: loadgen secrets|list|keys|delete-keys [flags]")
	}
	cmd, args := args[0], args[1:]
	fs := flag.NewFlagSet("loadgen "+cmd, flag.ContinueOnError)
	var conn connFlags
	conn.register(fs)
	namespace := fs.String("namespace", "", "namespace to work in (required)")
	count := fs.Int("count", 0, "number of objects")
	concurrency := fs.Int("concurrency", 16, "concurrent requests")
	var size, lists, expect int
	var label string
	switch cmd {
	case "secrets":
		fs.IntVar(&size, "size", 4096, "bytes of data in each Secret")
		fs.IntVar(&lists, "lists", 5, "full lists to measure")
	case "list":
		fs.IntVar(&expect, "expect", -1, "the number of Secrets the list must return")
	case "keys", "delete-keys":
		fs.StringVar(&label, "label", "", "KEY=VALUE label of the KmsKeys (required; the controller's --selector)")
	default:
		return fmt.Errorf("unknown command %q (secrets, list, keys, delete-keys)", cmd)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if conn.server == "" || conn.ca == "" || conn.cert == "" || conn.key == "" || *namespace == "" {
		return errors.New("--server, --ca, --cert, --key and --namespace are required")
	}
	if *concurrency < 1 {
		return errors.New("--concurrency must be at least 1")
	}
	c, err := newClient(conn.server, conn.ca, conn.cert, conn.key)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conn.timeout)
	defer cancel()

	var result any
	switch cmd {
	case "secrets":
		if *count < 1 || size < 1 || lists < 1 {
			return errors.New("--count, --size and --lists must be at least 1")
		}
		result, err = secretsBench(ctx, c, *namespace, *count, size, *concurrency, lists)
	case "list":
		if expect < 0 {
			return errors.New("--expect is required")
		}
		result, err = coldList(ctx, c, *namespace, expect)
	case "keys":
		if *count < 1 {
			return errors.New("--count must be at least 1")
		}
		result, err = keysBench(ctx, c, *namespace, *count, label, *concurrency)
	case "delete-keys":
		result, err = deleteKeys(ctx, c, *namespace, label, *concurrency)
	}
	if err != nil {
		return err
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	return out.Encode(result)
}
