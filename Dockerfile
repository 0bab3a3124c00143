# chime: build with the Rust toolchain, run on a small Debian image as a non-root user.
#
#   docker build -t chime .
#   docker run --rm -p 8080:8080 -v chime-data:/data chime serve --http-addr :8080 \
#       --database-url sqlite:///data/chime.db
#
# The Helm chart (helm/chime) runs this image with `serve` and CHIME_* settings.

FROM rust:1.95-bookworm AS build
# OpenSSL comes in through the Consul client crate (reqwest 0.11 with native-tls).
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/load.rs \
    && cargo build --release --locked --bin chime \
    && rm -rf src benches
COPY src src
COPY migrations migrations
COPY benches benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin chime

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin chime \
    && mkdir -p /data && chown chime:chime /data
COPY --from=build /src/target/release/chime /usr/local/bin/chime
USER 10001:10001
WORKDIR /data
EXPOSE 8080/tcp 7946/udp
ENTRYPOINT ["/usr/local/bin/chime"]
CMD ["serve", "--http-addr", ":8080"]
