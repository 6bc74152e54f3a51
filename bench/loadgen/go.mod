// The benchmark's API client: Secrets and KmsKeys over the REST API, with the standard
// library only.
module kubekms.io/bench/loadgen

go 1.26.0
