"""The local control plane: one implementation for `make up` (e2e/up.sh) and for the
benchmark (bench/), parameterised by run directory and ports."""
