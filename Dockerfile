# syntax=docker/dockerfile:1
# The msgpipe operator image: `docker build -t ghcr.io/msgpipe/msgpipe:0.1.0 .`
# The same binary carries every subcommand (`operator`, `crd`, `render`, `apply`, `dlq`).

FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first: this layer is rebuilt only when a manifest or Cargo.lock changes.
# Every workspace member needs its manifest and a stub source here (members: ".",
# "crates/msgpipe-client"; add new members to both steps), except crates/rbase64: a
# dependency of rabbitmq_http_client (patched in, see Cargo.toml), so it comes whole.
COPY Cargo.toml Cargo.lock ./
COPY crates/msgpipe-client/Cargo.toml crates/msgpipe-client/Cargo.toml
COPY crates/rbase64 crates/rbase64
RUN mkdir -p src crates/msgpipe-client/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs crates/msgpipe-client/src/lib.rs \
 && cargo build --release --locked --bin msgpipe \
 && rm -rf src crates/msgpipe-client/src

# The real sources. COPY keeps the files' own (older) mtimes, so the crate roots are touched
# to make cargo rebuild the two workspace crates over the stubs.
COPY src src
COPY crates crates
RUN touch src/main.rs src/lib.rs crates/msgpipe-client/src/lib.rs \
 && cargo build --release --locked --bin msgpipe \
 && install -m 0755 target/release/msgpipe /msgpipe

# distroless/cc: glibc, libgcc and CA certificates (rustls reads the system roots), no shell,
# no package manager. The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /msgpipe /msgpipe
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/msgpipe"]
CMD ["operator"]
