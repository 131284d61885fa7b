# Builds the three hookbox binaries; the runtime image is small, has no shell
# tools beyond Debian's base (health checks use `hookbox probe`) and
# runs as a non-root user. .dockerignore keeps .env and target/ out.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
ENV SQLX_OFFLINE=true
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/hookbox target/release/hookbox-receiver target/release/hookbox-worker /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin hookbox
COPY --from=build /out/ /usr/local/bin/
USER hookbox
ENV HOOKBOX_CONFIG=/etc/hookbox/hookbox.toml
EXPOSE 8080 9090
ENTRYPOINT ["hookbox-receiver"]
