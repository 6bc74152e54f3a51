# A small non-root image of the one kubekms binary.
#
# Not built in this repository's CI (there is no container engine on its machines); build
# it with `docker build -t ghcr.io/kubekms/kubekms:0.1.0 .` where you have one. protoc is not
# needed: build.rs compiles the protos with protox.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source changes reuse the cached dependency layer.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin kubekms

# distroless/cc: glibc and CA certificates, no shell; "nonroot" is uid 65532, which the
# Helm chart's runAsUser expects.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kubekms /usr/local/bin/kubekms
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubekms"]
