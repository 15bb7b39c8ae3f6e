/**
 * Token checks per second that back ends can ask of one gateway: gRPC
 * `gateway.auth.v1.TokenApi/Validate` over one HTTP/2 channel next to `POST /auth/validate`
 * over HTTP/1.1 keep-alive (undici's pool), the same token, `--inflight` requests in flight,
 * each for `--seconds` after a one-second warm-up; with the gateway's CPU seconds per 1000
 * checks. Both answers are checked (`valid: true`).
 *
 *   npm run bench:grpc -- [--inflight 32] [--seconds 5]
 */
import { newName, PASSWORD } from '../../test/helpers/accounts.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { call, grpcClients } from '../../test/helpers/grpc-client.ts';
import { freePort } from '../../test/helpers/own-redis.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:grpc',
  url: import.meta.url,
  about: 'token checks per second: gRPC TokenApi/Validate against POST /auth/validate, same gateway',
  readme: 'bench:grpc',
  options: {
    inflight: { type: 'int', default: 32, help: 'checks in flight' },
    seconds: { type: 'number', default: 5, help: 'seconds measured per way, after a second of warm-up' },
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

const INFLIGHT = values.inflight;
const SECONDS = values.seconds;

const port = await freePort();
const gw = await startGateway({ GW_GRPC_PORT: String(port), GW_LOG_LEVEL: 'info' });
const c = grpcClients(port);
try {
  const email = `${newName()}@example.com`;
  await call(c.auth, 'Register', { email, password: PASSWORD });
  const { accessToken } = await call<{ accessToken: string }>(c.auth, 'Login', { email, password: PASSWORD });
  const url = `http://127.0.0.1:${gw.httpPort}/auth/validate`;
  const body = JSON.stringify({ token: accessToken });

  const checks: Record<string, () => Promise<boolean>> = {
    'gRPC Validate': async () =>
      (await call<{ valid: boolean }>(c.token, 'Validate', { accessToken })).valid === true,
    'POST /auth/validate': async () => {
      const r = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      return ((await r.json()) as { valid: boolean }).valid === true;
    },
  };
  const rows: (string | number)[][] = [];
  for (const [name, check] of Object.entries(checks)) {
    let n = 0;
    let bad = 0;
    let stop = false;
    const loop = async () => {
      while (!stop) {
        if (await check()) n++;
        else bad++;
      }
    };
    const loops = Array.from({ length: INFLIGHT }, loop);
    await sleep(1000);
    n = 0;
    const cpu0 = cpuSeconds(gw.proc.pid!);
    const t0 = performance.now();
    await sleep(SECONDS * 1000);
    const s = (performance.now() - t0) / 1000;
    const done = n;
    const cpu = cpuSeconds(gw.proc.pid!) - cpu0;
    stop = true;
    await Promise.all(loops);
    if (bad) throw new Error(`${name}: ${bad} answers were not valid: true`);
    rows.push([name, Math.round(done / s), ((cpu * 1000) / done).toFixed(3)]);
  }
  console.log(header(`token checks: ${INFLIGHT} in flight, ${SECONDS} s each`));
  console.log(table(['path', 'checks/s', 'gateway CPU s per 1000'], rows));
} finally {
  c.close();
  await gw.stop();
}
