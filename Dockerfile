# syntax=docker/dockerfile:1
# The device gateway's image: build the TypeScript to dist/ and the native crypto addon in a
# builder stage with a C++ toolchain, then run the build on a slim runtime stage as a non-root
# user. How to build, run and stop it: docs/OPERATIONS.md ("Containers").

ARG NODE_IMAGE=node:20-bookworm-slim

FROM ${NODE_IMAGE} AS builder
# node-gyp needs python3, make and g++ for the crypto addon (native/binding.gyp); pg-native's
# libpq binding needs libpq-dev (headers and pg_config).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ libpq-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# `npm ci` builds the addon (`install`: native/build.mjs) and dist/ (`prepare`: scripts/build.mjs).
# The addon's build never fails an install (the gateway would fall back to node:crypto), so the
# image checks that it loads. Then the dev dependencies go: the runtime stage copies node_modules.
RUN npm ci --no-audit --no-fund \
 && node -e "require('./native/build/Release/gw_crypto.node')" \
 && npm prune --omit=dev --no-audit --no-fund

FROM ${NODE_IMAGE} AS runtime
# libpq5: pg-native's run-time library. tini: PID 1 that forwards signals and reaps children.
# The gateway's own user, and the directory of its keys (the volume below) owned by it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/device-gateway --no-create-home --shell /usr/sbin/nologin gateway \
 && install -d -o gateway -g gateway -m 0700 /var/lib/device-gateway
WORKDIR /app
# The server identity (devices may pin its fingerprint) and the JWT signing key live on the
# volume, so they survive a new container; back them up (docs/OPERATIONS.md, "Backups").
ENV NODE_ENV=production \
    GW_IDENTITY_FILE=/var/lib/device-gateway/identity.pem \
    GW_JWT_KEY_FILE=/var/lib/device-gateway/jwt-ed25519.pem
# Owned by root and read-only to the gateway's user: the process cannot change its own code.
COPY --from=builder /app/package.json ./
COPY --from=builder /app/node_modules/ node_modules/
COPY --from=builder /app/dist/ dist/
COPY --from=builder /app/native/build/Release/gw_crypto.node native/build/Release/
USER 10001:10001
VOLUME ["/var/lib/device-gateway"]
# Devices over TCP, HTTP + WebSocket (/ws) + health, Prometheus /metrics (GW_TCP_PORT,
# GW_HTTP_PORT, GW_METRICS_PORT).
EXPOSE 9000 8080 9100
# SIGTERM drains: not ready at once, GW_DRAIN_DELAY_MS later stop accepting and kick every device
# with `going_away`, exit 0; GW_SHUTDOWN_TIMEOUT_MS bounds it and the process exits at the
# latest 5 s after that. Give `docker stop -t` / compose's stop_grace_period more than
# GW_SHUTDOWN_TIMEOUT_MS + 5 s (the default 10 s of docker stop is too short for the defaults).
STOPSIGNAL SIGTERM
# Liveness only (restart when the process no longer serves); readiness is /health/ready, for load
# balancers. Node, since the slim image has no curl; it follows GW_HTTP_PORT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.GW_HTTP_PORT || 8080) + '/health/live', { signal: AbortSignal.timeout(4000) }).then((r) => process.exit(r.status === 200 ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["node", "dist/gateway/main.js"]
