/**
 * The wire core end to end: a real gateway process, real sockets, over TCP and WebSocket.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { GatewayClient } from '../../client/client.ts';
import {
  ClientHandshake,
  encodeFrame,
  HandshakeError,
  nodeBackend,
  ProtocolError,
  pack,
  parseWelcome,
  unpackMessage,
} from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { fetchWithin, nextEvent, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { rawConnect, rawHandshake } from '../helpers/raw-client.ts';

const HB = 400;
let gw: GatewayProcess;

before(async () => {
  gw = await startGateway({
    GW_HEARTBEAT_MS: String(HB),
    GW_HANDSHAKE_TIMEOUT_MS: '800',
    GW_MAX_FRAME: '4096',
  });
});
after(async () => {
  await gw.stop();
});

/** Reads plaintext or sealed frames until the connection closes; returns the decoded ones. */
async function drainPlain(next: () => Promise<Buffer>): Promise<Record<string, unknown>[]> {
  const out: Record<string, unknown>[] = [];
  for (;;) {
    try {
      out.push(unpackMessage(await next()));
    } catch {
      return out;
    }
  }
}

for (const transport of ['tcp', 'ws'] as const) {
  const url = () => (transport === 'tcp' ? gw.tcpUrl : gw.wsUrl);

  describe(`wire over ${transport}`, () => {
    test('handshake, then ping/pong both ways; the pin is accepted', async () => {
      const c = new GatewayClient({ url: url(), pinnedFingerprint: gw.fingerprint });
      const welcome = await c.connect();
      assert.equal(welcome.max, 4096);
      assert.equal(welcome.hb, HB);
      const rtt = await c.ping();
      assert.ok(rtt >= 0, 'rtt >= 0');
      const serverPing = await nextEvent<number>(c, 'ping');
      assert.ok(serverPing > 0, 'serverPing > 0');
      await c.close();
    });

    test('a wrong pinned fingerprint is refused by the client', async () => {
      const c = new GatewayClient({ url: url(), pinnedFingerprint: randomBytes(32).toString('hex') });
      await assert.rejects(
        c.connect(),
        (e: unknown) => e instanceof HandshakeError && e.reason === 'fingerprint_mismatch',
      );
    });

    test('a welcome with a bad signature is refused by the client', async () => {
      const raw = await rawConnect(url());
      const hs = new ClientHandshake(nodeBackend);
      raw.sendBody(pack(hs.hello));
      const welcome = parseWelcome(unpackMessage(await raw.next()));
      hs.finish({ ...welcome }); // the genuine one verifies
      const tampered = Buffer.from(welcome.sig);
      tampered[10] ^= 0x40;
      assert.throws(
        () => hs.finish({ ...welcome, sig: tampered }),
        (e: unknown) => e instanceof HandshakeError && e.reason === 'bad_signature',
      );
      raw.destroy();
    });

    for (const tamper of ['replayed', 'bit-flipped', 'counter-skipping'] as const) {
      test(`a ${tamper} frame gives decrypt_failed and a close`, async () => {
        const h = await rawHandshake(url());
        const first = h.seal({ type: 'ping', ts: 1 });
        h.raw.sendBody(first);
        assert.equal((await h.recvType('pong')).ts, 1);
        let bad: Buffer;
        if (tamper === 'replayed') bad = first;
        else if (tamper === 'bit-flipped') {
          bad = Buffer.from(h.seal({ type: 'ping', ts: 2 }));
          bad[14] ^= 1;
        } else {
          h.seal({ type: 'ping', ts: 2 }); // counter 1 never sent
          bad = h.seal({ type: 'ping', ts: 3 });
        }
        h.raw.sendBody(bad);
        const err = await h.recvType('error');
        assert.equal(err.code, 'decrypt_failed');
        assert.equal(err.fatal, true);
        await h.raw.closed;
      });
    }

    test('bytes before hello give handshake_required', async () => {
      const raw = await rawConnect(url());
      raw.sendBody(pack({ type: 'login', id: 1, username: 'a', password: 'b' }));
      const msgs = await drainPlain(() => raw.next());
      assert.equal(msgs[0].code, 'handshake_required');
      await raw.closed;
      const raw2 = await rawConnect(url());
      raw2.sendBody(randomBytes(40));
      assert.equal((await drainPlain(() => raw2.next()))[0].code, 'handshake_required');
      await raw2.closed;
    });

    test('a hello of another version is unsupported_version listing ours', async () => {
      const raw = await rawConnect(url());
      raw.sendBody(pack({ type: 'hello', v: 7, pub: randomBytes(32), nonce: randomBytes(16) }));
      const [err] = await drainPlain(() => raw.next());
      assert.equal(err.code, 'unsupported_version');
      assert.deepEqual(err.versions, [1]);
    });

    test('a client that stays silent is closed after about twice hb; one that answers stays', async () => {
      const silent = await rawHandshake(url(), false);
      const live = new GatewayClient({ url: url() });
      await live.connect();
      const t0 = Date.now();
      const kick = await silent.recvType('kick', 5000);
      assert.equal(kick.code, 'heartbeat_timeout');
      await silent.raw.closed;
      const waited = Date.now() - t0;
      assert.ok(waited >= 2 * HB - 100, `closed after ${waited} ms, before 2 × hb of silence`);
      await new Promise((r) => setTimeout(r, 3 * HB));
      assert.equal(live.isOpen, true);
      await live.ping();
      await live.close();
    });

    test('a connection that never says hello is closed at the handshake timeout', async () => {
      const raw = await rawConnect(url());
      const msgs = await drainPlain(() => raw.next(3000));
      assert.equal(msgs[0]?.code, 'handshake_required');
      assert.ok(raw.isClosed(), 'raw.isClosed()');
    });

    test('authenticated-only requests are unauthenticated; an unknown type is unknown_type', async () => {
      const c = new GatewayClient({ url: url() });
      await c.connect();
      for (const type of ['join', 'rooms', 'say', 'send', 'publish', 'sessions', 'revoke']) {
        await assert.rejects(
          c.request(type, { room: '#a', body: 'x', to: 'u', name: 'n', data: 1, sessionId: 's' }),
          (e: unknown) => e instanceof ProtocolError && e.code === 'unauthenticated',
          type,
        );
      }
      await assert.rejects(
        c.request('teleport'),
        (e: unknown) => e instanceof ProtocolError && e.code === 'unknown_type',
      );
      await assert.rejects(
        c.request('login', { password: 'x' }),
        (e: unknown) =>
          e instanceof ProtocolError && e.code === 'bad_message' && e.message.includes('username'),
      );
      const bye = await c.request('bye');
      assert.deepEqual(bye, {});
    });
  });
}

describe('framing errors over TCP', () => {
  test('L = 0 closes with bad_frame', async () => {
    const raw = await rawConnect(gw.tcpUrl);
    raw.sendBytes(Buffer.alloc(4));
    const [err] = await drainPlain(() => raw.next());
    assert.equal(err.code, 'bad_frame');
    await raw.closed;
  });

  test('L > max closes with frame_too_large before the body is sent', async () => {
    const raw = await rawConnect(gw.tcpUrl);
    const header = Buffer.alloc(4);
    header.writeUInt32BE(4097);
    raw.sendBytes(header);
    const [err] = await drainPlain(() => raw.next());
    assert.equal(err.code, 'frame_too_large');
    await raw.closed;
  });

  test('L > max after the handshake gets a sealed frame_too_large', async () => {
    const h = await rawHandshake(gw.tcpUrl);
    const header = Buffer.alloc(4);
    header.writeUInt32BE(5000);
    h.raw.sendBytes(header);
    const err = await h.recvType('error');
    assert.equal(err.code, 'frame_too_large');
    await h.raw.closed;
  });

  test('1-byte writes and 100 frames in one write both work', async () => {
    const h = await rawHandshake(gw.tcpUrl);
    const frame = encodeFrame(h.seal({ type: 'ping', ts: 42 }));
    for (const byte of frame) {
      h.raw.sendBytes(Buffer.from([byte]));
      await new Promise((r) => setImmediate(r));
    }
    assert.equal((await h.recvType('pong')).ts, 42);
    const many = Buffer.concat(
      Array.from({ length: 100 }, (_, i) => encodeFrame(h.seal({ type: 'ping', ts: i }))),
    );
    h.raw.sendBytes(many);
    for (let i = 0; i < 100; i++) assert.equal((await h.recvType('pong')).ts, i);
    h.raw.destroy();
  });
});

describe('a publish whose data nests too deep', () => {
  test('is bad_message naming data, with no error logged, however deep; the connection goes on', async () => {
    const h = await rawHandshake(gw.tcpUrl);
    const username = newName();
    h.raw.sendBody(
      h.seal({ type: 'register', id: 1, username, email: `${username}@example.com`, password: PASSWORD }),
    );
    assert.equal((await h.recvType('ok')).id, 1);
    h.raw.sendBody(h.seal({ type: 'login', id: 2, username, password: PASSWORD }));
    assert.equal((await h.recvType('ok')).id, 2);
    // `data` as arrays nested `depth` deep around 1, written byte by byte: the client library's
    // own encoder would overflow first.
    const publishOf = (id: number, depth: number) => {
      const head = pack({ type: 'publish', id, name: 'deep' });
      head[0] += 1; // one more field: data
      return Buffer.concat([head, pack('data'), Buffer.alloc(depth, 0x91), Buffer.from([0x01])]);
    };
    const errorsBefore = gw.logs.filter((l) => (l.level as number) >= 50).length;
    // 65 is the first depth past the bound; 3,000 overflowed the stack when the event was
    // encoded (an `internal` answer, and an error line with a stack for every such frame).
    for (const [id, depth, field] of [
      [3, 64, undefined],
      [4, 65, 'data'],
      [5, 3000, 'data'],
      [6, 4000, 'data'],
    ] as const) {
      h.raw.sendBody(h.channel.sealBytes(publishOf(id, depth)));
      let m = await h.recv(20_000);
      while (m.type !== 'ok' && m.type !== 'error') m = await h.recv(20_000);
      if (field === undefined) assert.equal(m.type, 'ok', `depth ${depth}: ${JSON.stringify(m)}`);
      else
        assert.deepEqual(
          [m.type, m.code, m.field],
          ['error', 'bad_message', field],
          `depth ${depth}: ${JSON.stringify(m)}`,
        );
    }
    h.raw.sendBody(h.seal({ type: 'ping', ts: 9 }));
    assert.equal((await h.recvType('pong')).ts, 9);
    const errors = gw.logs.filter((l) => (l.level as number) >= 50).slice(errorsBefore);
    assert.deepEqual(
      errors.map((l) => l.msg),
      [],
      'error lines logged',
    );
    h.raw.destroy();
  });
});

describe('framing errors over WebSocket', () => {
  test('an empty binary message is bad_frame; an oversized one frame_too_large', async () => {
    const raw = await rawConnect(gw.wsUrl);
    raw.sendBody(Buffer.alloc(0));
    assert.equal((await drainPlain(() => raw.next()))[0].code, 'bad_frame');
    const raw2 = await rawConnect(gw.wsUrl);
    raw2.sendBody(Buffer.alloc(4097));
    assert.equal((await drainPlain(() => raw2.next()))[0].code, 'frame_too_large');
  });

  test('a text message closes with 1003', async () => {
    const raw = await rawConnect(gw.wsUrl);
    raw.sendText('hello');
    assert.equal(await raw.closed, 1003);
  });
});

/**
 * The TCP sockets process `pid` holds whose peer is one of `ports` on this host, as
 * `port state` (the state in hex, as /proc/net/tcp gives it): its descriptors' socket inodes
 * matched against the connections' table.
 */
function socketsOf(pid: number, ports: Set<number | undefined>): string[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const link = readlinkSync(`/proc/${pid}/fd/${fd}`);
      if (link.startsWith('socket:[')) inodes.add(link.slice(8, -1));
    } catch {
      // closed meanwhile
    }
  }
  const held: string[] = [];
  for (const table of ['tcp', 'tcp6']) {
    for (const line of readFileSync(`/proc/${pid}/net/${table}`, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || !inodes.has(f[9])) continue;
      const remotePort = Number.parseInt(f[2].split(':')[1], 16);
      if (ports.has(remotePort)) held.push(`${remotePort} ${f[3]}`);
    }
  }
  return held;
}

describe('limits and lifecycle (own gateway processes)', () => {
  test('per-IP connection limit of 1 (the chat seed rule) on TCP and WS together', async () => {
    const g = await startGateway({ GW_MAX_CONN_PER_IP: '1' });
    try {
      const first = new GatewayClient({ url: g.tcpUrl });
      await first.connect();
      for (const u of [g.tcpUrl, g.wsUrl]) {
        const raw = await rawConnect(u);
        const [err] = await drainPlain(() => raw.next());
        assert.equal(err.code, 'conn_limit');
        await raw.closed;
      }
      await first.close();
      // The slot is free again once the first connection is gone: the gateway counts it closed
      // (a fixed wait raced its reading of the close).
      await until('the gateway to count the first connection closed', async () => {
        const m = await scrapeMetrics(g.metricsPort);
        return ['tcp', 'ws'].every((t) => m.value(`gateway_connections_open{transport="${t}"}`) === 0);
      });
      const again = new GatewayClient({ url: g.wsUrl });
      await again.connect();
      await again.close();
    } finally {
      await g.stop();
    }
  });

  test('TCP connections refused at the per-IP limit are closed, however their clients behave', async () => {
    const g = await startGateway({ GW_MAX_CONN_PER_IP: '1' });
    try {
      const first = new GatewayClient({ url: g.tcpUrl });
      await first.connect();
      const port = Number(new URL(g.tcpUrl).port);
      const open = (allowHalfOpen: boolean): Promise<Socket> =>
        within(
          'a TCP connection',
          new Promise((resolve, reject) => {
            const s = connect({ host: '127.0.0.1', port, allowHalfOpen }, () => resolve(s));
            s.on('error', reject);
          }),
        );
      // Clients that send their hello at once, as devices do, and close when the gateway does;
      // and clients that send it and never close their side. The gateway answers conn_limit and
      // must keep neither socket.
      const hello = encodeFrame(pack(new ClientHandshake(nodeBackend).hello));
      const closing = await Promise.all(Array.from({ length: 20 }, () => open(false)));
      const lingering = await Promise.all(Array.from({ length: 20 }, () => open(true)));
      const answered = new Set<Socket>();
      for (const s of [...closing, ...lingering]) {
        s.on('data', () => answered.add(s));
        s.write(hello);
      }
      // Every socket accepted and answered first, so that the count below is taken after them.
      await until('conn_limit written to all 40', () => answered.size === 40);
      // The gateway's descriptors that are TCP sockets of these 40 connections (a count of all
      // its descriptors also counted ones it opened meanwhile for Redis or PostgreSQL).
      const mine = new Set([...closing, ...lingering].map((s) => s.localPort));
      let held: string[] = [];
      await until('the gateway holding none of the 40 refused connections', () => {
        held = socketsOf(g.proc.pid!, mine);
        return held.length === 0;
      }).catch((e: Error) => {
        throw new Error(`${e.message}; still held (remote port, TCP state): ${held.join(', ')}`);
      });
      for (const s of [...closing, ...lingering]) s.destroy();
      await first.close();
    } finally {
      await g.stop();
    }
  });

  test('the key usage limit closes with kick rekey_required', async () => {
    const g = await startGateway({ GW_REKEY_AFTER_FRAMES: '6' });
    try {
      const c = new GatewayClient({ url: g.tcpUrl });
      await c.connect();
      const kicked = nextEvent<{ code: string }>(c, 'kick');
      for (let i = 0; i < 5; i++) c.sendMessage({ type: 'ping', ts: i });
      assert.equal((await kicked).code, 'rekey_required');
    } finally {
      await g.stop();
    }
  });

  test('events sent back to back reach the key limit: kick rekey_required, the node lives on and the events come again', async () => {
    // Server frames with no client frame between them: the limit is met on the send side, where
    // the key's last frame is kept for the kick (PROTOCOL.md §3).
    const key = 'test-api-key-rekey-0123456789';
    const g = await startGateway({ GW_REKEY_AFTER_FRAMES: '12', GW_API_KEY: key, GW_DEFAULT_ROOM: '' });
    try {
      const c = await connected(g.tcpUrl, { autoAck: false });
      const s = await signUp(c);
      const got: number[] = [];
      c.on('event', (e: { data: number }) => got.push(e.data));
      const kicked = nextEvent<{ code: string }>(c, 'kick');
      const closed = nextEvent(c, 'close');
      const res = await fetchWithin(`http://127.0.0.1:${g.httpPort}/v1/events`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
        body: JSON.stringify({
          events: Array.from({ length: 20 }, (_, i) => ({
            target: { session: s.sessionId },
            name: 'n',
            data: i,
          })),
        }),
      });
      assert.equal(res.status, 202);
      assert.equal((await kicked).code, 'rekey_required');
      await closed;
      assert.ok(got.length < 20, `${got.length} events came before the kick`);
      assert.deepEqual(got, [...Array(got.length).keys()], 'the events before the kick, in order');
      // Nothing was acked: all 20 are still in the session's outbox.
      const r = redisClient();
      try {
        assert.equal(await r.zcard(`${g.prefix}{s:${s.sessionId}}:q`), 20);
      } finally {
        r.disconnect();
      }
      // The node lives on: the device's next connection is sent the outbox from its start (as
      // many as this key limit lets through before the next kick).
      const again = await connected(g.tcpUrl, { autoAck: false });
      const next: number[] = [];
      again.on('event', (e: { data: number }) => next.push(e.data));
      const kickedAgain = nextEvent<{ code: string }>(again, 'kick');
      await again.request('resume', { token: s.token });
      assert.equal((await kickedAgain).code, 'rekey_required');
      assert.ok(next.length > 0, 'next.length > 0');
      assert.deepEqual(next, [...Array(next.length).keys()]);
      assert.equal(g.proc.exitCode, null, 'the gateway process is still running');
      // What the delivery pump took for the connection after the kick is not sent, and is no
      // error: it stays in the outbox (before, each such event was a ProtocolError logged as
      // "could not send pumped events", and that call's receipts were never reported). The
      // gateway's lines come in order: once a line logged after the kick is read, so is any
      // line of the kick's tick.
      const from = g.logs.length;
      const marker = await connected(g.tcpUrl);
      await signUp(marker);
      await marker.close();
      await g.waitForLog((l) => l.msg === 'user registered' && g.logs.indexOf(l) >= from);
      const errors = g.logs.filter((l) => (l.level as number) >= 50);
      assert.deepEqual(
        errors.map((l) => l.msg),
        [],
        'no error logged at the key limit',
      );
    } finally {
      await g.stop();
    }
  });

  test('SIGTERM kicks every client with going_away and a jittered retryAfter, then exits 0', async () => {
    const g = await startGateway({ GW_RECONNECT_JITTER_MS: '5000' });
    const clients = [];
    for (let i = 0; i < 6; i++) {
      const c = new GatewayClient({ url: i % 2 ? g.wsUrl : g.tcpUrl });
      await c.connect();
      clients.push(c);
    }
    const kicks = clients.map((c) => nextEvent<{ code: string; retryAfter?: number }>(c, 'kick'));
    const closes = clients.map((c) => nextEvent(c, 'close'));
    g.proc.kill('SIGTERM');
    const got = await Promise.all(kicks);
    await Promise.all(closes);
    assert.equal(await g.exited, 0);
    for (const k of got) {
      assert.equal(k.code, 'going_away');
      assert.ok(
        typeof k.retryAfter === 'number' && k.retryAfter >= 0 && k.retryAfter <= 5000,
        "typeof k.retryAfter === 'number' && k.retryAfter >= 0 && k.retryAfter <= 5000",
      );
    }
    assert.ok(new Set(got.map((k) => k.retryAfter)).size > 1, 'retryAfter is randomised per connection');
  });

  test('the identity file is created 0600 once and reused; its fingerprint is logged', async () => {
    const { mkdtempSync, rmSync, statSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const dir = mkdtempSync(join(tmpdir(), 'gw-id-'));
    const file = join(dir, 'id.pem');
    try {
      const a = await startGateway({ GW_IDENTITY_FILE: file });
      await a.stop();
      assert.equal(statSync(file).mode & 0o777, 0o600);
      const b = await startGateway({ GW_IDENTITY_FILE: file });
      await b.stop();
      assert.equal(a.fingerprint, b.fingerprint);
      assert.match(a.fingerprint, /^[0-9a-f]{64}$/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('an invalid setting stops start-up with a message naming the variable', async () => {
    const { spawnSync } = await import('node:child_process');
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'gateway/main.ts'], {
      cwd: new URL('../../', import.meta.url).pathname,
      env: { ...process.env, GW_TCP_PORT: 'abc', GW_HEARTBEAT_MS: '5', GW_CRYPTO: 'fast' },
      encoding: 'utf8',
    });
    assert.equal(r.status, 2);
    for (const v of ['GW_TCP_PORT', 'GW_HEARTBEAT_MS', 'GW_CRYPTO']) assert.match(r.stderr, new RegExp(v));
  });
});

describe('crypto backends in the gateway', () => {
  for (const backend of ['node', 'native'] as const) {
    test(`GW_CRYPTO=${backend}: reported in health and metrics; clients on either backend talk to it`, async (t) => {
      const { selectBackend } = await import('../../protocol/index.ts');
      let g: GatewayProcess;
      try {
        g = await startGateway({ GW_CRYPTO: backend });
      } catch (e) {
        if (backend === 'native' && process.env.GW_REQUIRE_NATIVE !== '1') {
          t.skip('native addon not built here');
          return;
        }
        throw e;
      }
      try {
        const health = (await (await fetchWithin(`http://127.0.0.1:${g.httpPort}/healthz`)).json()) as {
          crypto: string;
        };
        assert.equal(health.crypto, backend);
        const metrics = await (await fetchWithin(`http://127.0.0.1:${g.metricsPort}/metrics`)).text();
        assert.match(metrics, new RegExp(`gateway_crypto_backend_info\\{backend="${backend}"\\} 1`));
        assert.ok(
          g.logs.some((l) => l.msg === 'crypto backend' && l.backend === backend),
          "g.logs.some((l) => l.msg === 'crypto backend' && l.backend === backend)",
        );
        for (const pref of ['node', 'auto'] as const) {
          const c = new GatewayClient({ url: g.tcpUrl, backend: selectBackend(pref).backend });
          await c.connect();
          await c.ping();
          await c.close();
        }
      } finally {
        await g.stop();
      }
    });
  }
});

describe('backpressure', () => {
  test('a device that stops reading is closed as overloaded; the gateway does not buffer without bound', async () => {
    const { connect } = await import('node:net');
    const { Channel, FrameDecoder, parseWelcome } = await import('../../protocol/index.ts');
    const g = await startGateway({ GW_MAX_PENDING_BYTES: '65536', GW_API_KEY: 'k', GW_DEFAULT_ROOM: '' });
    try {
      const u = new URL(g.tcpUrl);
      const s = connect({ host: u.hostname, port: Number(u.port) });
      s.on('error', () => {});
      const hs = new ClientHandshake(nodeBackend);
      const d = new FrameDecoder(1 << 20);
      const bodies: Buffer[] = [];
      let wake = () => {};
      s.on('data', (c) =>
        d.push(c, (b) => {
          bodies.push(Buffer.from(b));
          wake();
        }),
      );
      const next = async () => {
        while (bodies.length === 0)
          await within('a frame from the gateway', new Promise<void>((r) => (wake = r)));
        return bodies.shift()!;
      };
      s.write(encodeFrame(pack(hs.hello)));
      const ch = new Channel(nodeBackend, hs.finish(parseWelcome(unpackMessage(await next()))), 'client');
      const name = `bp${Date.now() % 1e8}`;
      s.write(
        encodeFrame(
          ch.seal({
            type: 'register',
            id: 1,
            username: name,
            email: `${name}@example.com`,
            password: 'password-123',
          }),
        ),
      );
      s.write(encodeFrame(ch.seal({ type: 'login', id: 2, username: name, password: 'password-123' })));
      let session: { sessionId: string } | undefined;
      while (!session) {
        const m = ch.open(await next());
        if (m.type === 'ok' && m.id === 2) session = m.data as { sessionId: string };
      }
      s.pause(); // never read again: whatever the gateway sends piles up
      const events = Array.from({ length: 500 }, (_, i) => ({
        target: { session: session!.sessionId },
        name: 'flood',
        qos: 0,
        data: { i, pad: 'x'.repeat(200) },
      }));
      let line: Record<string, unknown> | undefined;
      for (let i = 0; i < 400 && !line; i++) {
        await fetchWithin(`http://127.0.0.1:${g.httpPort}/v1/events`, {
          method: 'POST',
          headers: { authorization: 'Bearer k', 'content-type': 'application/json' },
          body: JSON.stringify({ events }),
        });
        line = g.logs.find((l) => String(l.msg).includes('overloaded'));
      }
      line ??= await g.waitForLog((l) => String(l.msg).includes('overloaded'), 10000);
      assert.ok((line.pending as number) > 65536, '(line.pending as number) > 65536');
      assert.ok((line.pending as number) < 65536 + 200_000, 'closed at the bound, not long after');
      s.destroy();
    } finally {
      await g.stop();
    }
  });
});
