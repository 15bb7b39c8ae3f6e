/**
 * Handshake soak: many full handshakes in ONE process with the protocol library only, under a
 * watchdog, to show that the handshake never stalls.
 *
 *   npm run bench:soak -- [--count 100000] [--backend node|native] [--jwk-control]
 *                         [--stall-seconds 10] [--simulate-stall N]
 *
 * Each iteration: `ClientHandshake` (hello) → MessagePack round trip → `acceptHello` (welcome)
 * → MessagePack round trip → `ClientHandshake.finish` → one sealed round trip (client ping
 * opened by the server, server pong opened by the client), with both sides' keys checked equal.
 * Ephemeral keys are raw (the backend's `x25519KeyPair`), as in the gateway.
 *
 * `--jwk-control` runs the same loop but makes each ephemeral key the way that hung Node 20's
 * main thread in about one run of ten: `crypto.generateKeyPairSync('x25519')` exported with
 * `.export({format: 'jwk'})` (the raw key is then taken from the JWK). It may or may not hang
 * in a given run; the output says what happened.
 *
 * Watchdog: this script is a supervisor. It forks itself as the worker process (`--child`),
 * which runs the loop and reports progress over IPC every few hundred handshakes. If no progress
 * arrives for `--stall-seconds` (default 10), the supervisor prints a STALL report (with the
 * child's CPU time during the silence and its threads' states, to tell a spin from a block),
 * kills the child and exits with status 2. `--simulate-stall N` blocks the child's main thread
 * at handshake N, to check the watchdog itself.
 *
 * Exit status: 0 done, 1 a handshake failed, 2 STALL.
 */
import { fork } from 'node:child_process';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { build } from 'hdr-histogram-js';
import {
  acceptHello,
  Channel,
  ClientHandshake,
  type CryptoBackend,
  nodeBackend,
  pack,
  parseHello,
  parseWelcome,
  unpackMessage,
} from '../../protocol/index.ts';
import { benchArgs } from '../lib/args.ts';
import { probeNative } from '../lib/backends.ts';
import { fmt } from '../lib/measure.ts';
import { processCpuMicros } from '../lib/proc.ts';

const { values: a } = benchArgs({
  script: 'bench:soak',
  url: import.meta.url,
  about: 'full handshakes in one process under a stall watchdog (a supervisor forks the worker)',
  readme: 'bench:soak',
  options: {
    count: { type: 'int', default: 100000, help: 'handshakes' },
    backend: { type: 'string', choices: ['node', 'native'], default: 'node', help: 'the crypto backend' },
    'jwk-control': {
      type: 'flag',
      help: "make each ephemeral key the way that hung Node 20's main thread (generateKeyPairSync, JWK export)",
    },
    'stall-seconds': {
      type: 'number',
      default: 10,
      help: 'silence after which the watchdog reports a STALL',
    },
    'simulate-stall': {
      type: 'int',
      min: 0,
      arg: 'N',
      help: "block the worker's main thread at handshake N (checks the watchdog)",
    },
    // This process is the worker, forked by the supervisor.
    child: { type: 'flag', hidden: true, help: 'the worker process' },
  },
});

const count = a.count;
const backendName = a.backend;
const jwk = a['jwk-control'];
const stallMs = a['stall-seconds'] * 1000;

/** Messages from the child to the supervisor. */
type ChildMessage =
  | { type: 'progress'; done: number }
  | { type: 'unavailable'; reason: string }
  | { type: 'done'; done: number };

const PROGRESS_EVERY = 256;
const STATUS_EVERY = 10_000;

if (a.child) await child();
else await supervise();

// ---- the worker process ------------------------------------------------------------------

async function child(): Promise<void> {
  const send = (m: ChildMessage) => process.send!(m);
  let backend: CryptoBackend;
  if (backendName === 'native') {
    const { native, reason } = probeNative();
    if (!native) {
      send({ type: 'unavailable', reason: reason ?? 'unknown' });
      process.disconnect();
      return;
    }
    backend = native;
  } else {
    backend = nodeBackend;
  }
  const simulateAt = a['simulate-stall'] ?? -1;
  const identity = backend.ed25519Identity(randomBytes(32));
  const serverOptions = { node: 'soak', heartbeatMs: 15000, maxFrameBytes: 65536 };
  const hist = build({ lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000, autoResize: true });

  /** The control's key generation: node:crypto KeyObject → JWK → raw private key. */
  const jwkPrivateKey = (): Buffer => {
    const { privateKey, publicKey } = generateKeyPairSync('x25519');
    const priv = privateKey.export({ format: 'jwk' });
    const pub = publicKey.export({ format: 'jwk' });
    if (pub.x !== priv.x) throw new Error('JWK public keys differ');
    return Buffer.from(priv.d!, 'base64url');
  };

  const t0 = performance.now();
  let lastStatus = t0;
  let lastStatusDone = 0;
  for (let i = 0; i < count; i++) {
    if (i === simulateAt) {
      console.log(`soak: --simulate-stall: blocking the main thread at handshake ${i}`);
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
    }
    const h0 = performance.now();
    const client = new ClientHandshake(
      backend,
      jwk ? { client: 'soak', ephemeralPrivateKey: jwkPrivateKey() } : { client: 'soak' },
    );
    const hello = parseHello(unpackMessage(pack(client.hello)));
    const { welcome, keys: serverKeys } = acceptHello(
      backend,
      identity,
      hello,
      jwk ? { ...serverOptions, ephemeralPrivateKey: jwkPrivateKey() } : serverOptions,
    );
    const clientKeys = client.finish(parseWelcome(unpackMessage(pack(welcome))));
    if (!clientKeys.c2s.equals(serverKeys.c2s) || !clientKeys.s2c.equals(serverKeys.s2c)) {
      throw new Error(`handshake ${i}: the two sides derived different keys`);
    }
    const c = new Channel(backend, clientKeys, 'client');
    const s = new Channel(backend, serverKeys, 'server');
    const ping = s.open(c.seal({ type: 'ping', ts: i }));
    const pong = c.open(s.seal({ type: 'pong', ts: ping.ts as number }));
    if (pong.type !== 'pong' || pong.ts !== i) throw new Error(`handshake ${i}: bad sealed round trip`);
    c.dispose();
    s.dispose();
    const now = performance.now();
    hist.recordValue(Math.max(1, Math.round((now - h0) * 1000)));

    const done = i + 1;
    if (done % STATUS_EVERY === 0 || done === count) {
      const rate = ((done - lastStatusDone) * 1000) / (now - lastStatus);
      console.log(
        `soak: ${String(done).padStart(String(count).length)}/${count} handshakes, ` +
          `${fmt(rate)}/s over the last ${done - lastStatusDone}, elapsed ${((now - t0) / 1000).toFixed(1)} s`,
      );
      lastStatus = now;
      lastStatusDone = done;
    }
    if (done % PROGRESS_EVERY === 0) {
      send({ type: 'progress', done });
      // Yield so that the progress message leaves now (the loop is otherwise synchronous).
      await new Promise((r) => setImmediate(r));
    }
  }
  const seconds = (performance.now() - t0) / 1000;
  console.log(
    `soak: done: ${count} handshakes (${backend.name} backend${jwk ? ', JWK control' : ''}) in ` +
      `${seconds.toFixed(1)} s: ${fmt(count / seconds)} handshakes/s; per handshake ` +
      `p50 ${(hist.getValueAtPercentile(50) / 1000).toFixed(3)} ms, ` +
      `p99 ${(hist.getValueAtPercentile(99) / 1000).toFixed(3)} ms, ` +
      `max ${(hist.maxValue / 1000).toFixed(3)} ms`,
  );
  send({ type: 'done', done: count });
  process.disconnect();
}

// ---- the supervisor ----------------------------------------------------------------------

function threadStates(pid: number): string {
  try {
    const states = new Map<string, number>();
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
      states.set(state, (states.get(state) ?? 0) + 1);
    }
    let main = '?';
    try {
      main = readFileSync(`/proc/${pid}/wchan`, 'utf8') || '0';
    } catch {}
    return `threads by state ${[...states].map(([s, n]) => `${s}:${n}`).join(' ')}; main thread wchan ${main}`;
  } catch {
    return 'thread states unavailable';
  }
}

async function supervise(): Promise<void> {
  const args = process.argv.slice(2).filter((x) => x !== '--child');
  console.log(
    `soak: ${count} handshakes, ${backendName} backend${jwk ? ', JWK control (generateKeyPairSync + export jwk)' : ''}; ` +
      `watchdog: STALL after ${stallMs / 1000} s without progress; node ${process.version}`,
  );
  const proc = fork(fileURLToPath(import.meta.url), [...args, '--child'], { stdio: 'inherit' });
  const started = performance.now();
  let lastProgress = started;
  let done = 0;
  let longestSilence = 0;
  let finished: ChildMessage | undefined;

  proc.on('message', (m: ChildMessage) => {
    const now = performance.now();
    longestSilence = Math.max(longestSilence, now - lastProgress);
    lastProgress = now;
    if (m.type === 'progress') done = m.done;
    else finished = m;
  });
  const onSigint = () => {
    proc.kill('SIGKILL');
    console.log(`soak: interrupted after ${done} handshakes`);
    process.exit(130);
  };
  process.on('SIGINT', onSigint);

  let stallCpuStart: number | null = null;
  let stalled = false;
  const watchdog = setInterval(() => {
    const silence = performance.now() - lastProgress;
    // Sample the child's CPU half-way through a silence, to tell spinning from blocking.
    if (silence >= stallMs / 2 && stallCpuStart === null) stallCpuStart = processCpuMicros(proc.pid!);
    if (silence < stallMs / 2) stallCpuStart = null;
    if (silence < stallMs || stalled) return;
    stalled = true;
    const cpuNow = processCpuMicros(proc.pid!);
    const busy =
      stallCpuStart !== null && cpuNow !== null
        ? `child CPU over the last ${(silence / 2000).toFixed(1)} s of silence: ${((cpuNow - stallCpuStart) / 1e6).toFixed(2)} s`
        : 'child CPU unknown';
    console.log(
      `STALL: no progress for ${(silence / 1000).toFixed(1)} s; last progress report at ${done} handshakes ` +
        `(child pid ${proc.pid}; ${busy}; ${threadStates(proc.pid!)}); killing it`,
    );
    proc.kill('SIGKILL');
  }, 250);

  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
    proc.on('exit', (c, s) => resolve([c, s])),
  );
  clearInterval(watchdog);
  process.off('SIGINT', onSigint);
  const total = (performance.now() - started) / 1000;
  if (stalled) {
    console.log(
      `soak: RESULT STALL (watchdog fired ${total.toFixed(1)} s into the run; last report at ${done} handshakes)`,
    );
    process.exit(2);
  }
  if (finished?.type === 'unavailable') {
    console.log(`soak: ${backendName} backend n/a (${finished.reason})`);
    process.exit(0);
  }
  if (finished?.type === 'done' && code === 0) {
    console.log(
      `soak: RESULT OK, no stall: longest silence between progress reports ` +
        `${(longestSilence / 1000).toFixed(2)} s (limit ${stallMs / 1000} s), total ${total.toFixed(1)} s`,
    );
    process.exit(0);
  }
  console.log(`soak: RESULT FAILED: child exited with ${code ?? signal} after ${done} handshakes`);
  process.exit(1);
}
