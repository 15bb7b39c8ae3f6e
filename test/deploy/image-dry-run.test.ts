/**
 * A dry run of the Dockerfile without Docker (no registry can be reached, so no base image):
 * the builder stage's commands run as written on a copy of the build context (the repository's
 * files less .dockerignore), then exactly what the runtime stage COPYs goes into a fresh folder,
 * and the gateway runs from there as in the container: as an unprivileged user (nobody, when
 * the test runs as root), with the image's ENV, its key folder (the VOLUME) owned by that user,
 * migrations by compose's one-shot command, the CMD, the HEALTHCHECK's command, and SIGTERM.
 *
 * What it cannot show: the apt-get lines (this machine's packages stand for them), useradd,
 * and anything about the base image itself.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, type SpawnOptions, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, isAbsolute, join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, test } from 'node:test';
import { parse } from 'yaml';
import { killOnRunnerTerm } from '../helpers/children.ts';
import { DATABASE_URL, dropRedisPrefix, dropSchema, REDIS_URL } from '../helpers/cleanup.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import { contextFilter, execForm, last, ROOT, readDockerfile, type Stage } from '../helpers/dockerfile.ts';
import { freePort } from '../helpers/own-redis.ts';

const { stages } = readDockerfile();
const builder = stages[0];
const runtime = stages.at(-1)!;
const NOBODY = 65534;
const asRoot = process.getuid?.() === 0;

const work = mkdtempSync(join(tmpdir(), 'gw-image-'));
chmodSync(work, 0o755);
const builderDir = join(work, 'builder');
const runtimeDir = join(work, 'runtime');
const tag = randomUUID().slice(0, 8);
const prefix = `gwtest:${tag}:`;
const schema = `gwtest_${tag}`;
let gateway: ChildProcess | undefined;

/** The gateway's own pid, from its log lines (pino's `pid`): under tini it is not ours. */
let gatewayPid: number | undefined;

after(async () => {
  // A failed test leaves it running. tini forwards SIGTERM (the drain); SIGKILL to tini alone
  // would orphan node, which tini puts in a process group of its own.
  if (gateway && gateway.exitCode === null && gateway.signalCode === null) {
    const exited = new Promise((resolve) => gateway!.once('exit', resolve));
    gateway.kill('SIGTERM');
    await within('the gateway to exit after SIGTERM', exited, 30_000).catch(() => {
      for (const pid of [gateway!.pid, gatewayPid]) {
        try {
          if (pid) process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    });
  }
  rmSync(work, { recursive: true, force: true });
  await Promise.all([dropRedisPrefix(prefix), dropSchema(schema)]);
});

/** Runs a program to its end within `ms`; its exit code and its output (both streams). */
async function run(
  what: string,
  cmd: string,
  args: string[],
  opts: SpawnOptions,
  ms: number,
): Promise<{ code: number | null; out: string }> {
  const p = spawn(cmd, args, { ...opts, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  p.stdout!.on('data', (d) => {
    out += d;
  });
  p.stderr!.on('data', (d) => {
    out += d;
  });
  const exited = new Promise<number | null>((resolve, reject) => {
    p.on('error', reject);
    p.on('close', (code) => resolve(code));
  });
  try {
    return { code: await within(what, exited, ms), out };
  } finally {
    if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  }
}

/** The build context: the repository's files (as git lists them) less .dockerignore. */
function contextFiles(): string[] {
  const listed = execFileSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], {
    cwd: ROOT,
    encoding: 'utf8',
  })
    .split('\0')
    .filter((p) => p && existsSync(join(ROOT, p)) && statSync(join(ROOT, p)).isFile());
  return contextFilter().filter(listed);
}

/** Docker's COPY of one source (a file, or a folder's contents) to a destination. */
function copy(source: string, dest: string): void {
  if (statSync(source).isDirectory()) {
    mkdirSync(dest, { recursive: true });
    cpSync(source, dest, { recursive: true, verbatimSymlinks: true });
  } else {
    const to = dest.endsWith('/') ? join(dest, basename(source)) : dest;
    mkdirSync(dirname(to), { recursive: true });
    copyFileSync(source, to);
  }
}

/** Paths of the image (WORKDIR, VOLUME) and the folders that stand for them here. */
class PathMap {
  private readonly map = new Map<string, string>();
  set(inImage: string, here: string): void {
    this.map.set(inImage, here);
  }
  /** An absolute path of the image as a path here (values of ENV too). */
  here(p: string): string {
    for (const [inImage, local] of this.map) {
      if (p === inImage || p.startsWith(`${inImage}/`)) return local + p.slice(inImage.length);
    }
    return p;
  }
}

/** A destination of COPY: relative to the WORKDIR, or absolute in the image. */
function destination(dest: string, cwd: string | undefined, paths: PathMap): string {
  if (isAbsolute(dest)) return paths.here(dest) + (dest.endsWith('/') ? '/' : '');
  assert.ok(cwd, `COPY to ${dest} before any WORKDIR`);
  return join(cwd, dest) + (dest.endsWith('/') || dest === '.' || dest === './' ? '/' : '');
}

const builderPaths = new PathMap();

test("the builder stage's commands build the gateway from the build context", {
  timeout: 900_000,
}, async (t) => {
  let cwd: string | undefined;
  const env: Record<string, string> = {};
  const files = contextFiles();
  for (const step of builder.steps) {
    if (step.keyword === 'WORKDIR') {
      builderPaths.set(step.args[0], builderDir);
      cwd = builderPaths.here(step.args[0]);
      mkdirSync(cwd, { recursive: true });
    } else if (step.keyword === 'COPY') {
      assert.equal(step.flags.from, undefined, 'the builder copies from the build context only');
      const dest = destination(step.args.at(-1)!, cwd, builderPaths);
      for (const src of step.args.slice(0, -1)) {
        const chosen =
          src === '.' ? files : files.filter((f) => f === src || f.startsWith(`${src.replace(/\/$/, '')}/`));
        assert.ok(chosen.length > 0, `COPY ${src}: in the build context`);
        const base = src === '.' ? '' : src.replace(/\/$/, '');
        for (const f of chosen)
          copy(join(ROOT, f), join(dest, base === f ? basename(f) : f.slice(base.length)));
      }
    } else if (step.keyword === 'ENV') {
      for (const [k, v] of step.properties) env[k] = v;
    } else if (step.keyword === 'RUN') {
      if (/^apt-get\b/.test(step.text.trim())) {
        t.diagnostic(`not run (this machine's packages stand for it): RUN ${step.text.slice(0, 100)}…`);
        continue;
      }
      // From npm's cache where it can (.ci/run's npm ci filled it), else the registry.
      const r = await run(
        `RUN at line ${step.line}`,
        'sh',
        ['-c', step.text],
        { cwd, env: { ...process.env, ...env, npm_config_prefer_offline: 'true' } },
        600_000,
      );
      assert.equal(r.code, 0, `RUN at line ${step.line} failed:\n${r.out.slice(-4000)}`);
    } else {
      assert.ok(['ARG', 'LABEL'].includes(step.keyword), `the dry run knows ${step.keyword} in the builder`);
    }
  }
  assert.ok(existsSync(join(builderDir, 'dist/gateway/main.js')), 'npm ci built dist/');
  assert.ok(!existsSync(join(builderDir, 'node_modules/typescript')), 'dev dependencies are pruned');
});

/** The runtime stage laid out here: files, ENV (paths mapped), and what runs. */
function layRuntime(t: { diagnostic(m: string): void }, stage: Stage) {
  const paths = new PathMap();
  const env: Record<string, string> = {};
  let cwd: string | undefined;
  const volumes: string[] = [];
  for (const step of stage.steps) {
    if (step.keyword === 'VOLUME') {
      volumes.push(...(step.text.trim().startsWith('[') ? (JSON.parse(step.text) as string[]) : step.args));
    }
  }
  // The image's RUN makes each volume's folder 0700 for the user (`install -d -o … -m 0700`).
  volumes.forEach((v, i) => {
    const here = join(work, `volume-${i}`);
    mkdirSync(here, { mode: 0o700 });
    if (asRoot) chownSync(here, NOBODY, NOBODY);
    paths.set(v, here);
  });
  for (const step of stage.steps) {
    if (step.keyword === 'WORKDIR') {
      paths.set(step.args[0], runtimeDir);
      cwd = runtimeDir;
      mkdirSync(cwd, { recursive: true });
      chmodSync(cwd, 0o755);
    } else if (step.keyword === 'COPY') {
      assert.equal(step.flags.from, builder.name);
      const dest = destination(step.args.at(-1)!, cwd, paths);
      for (const src of step.args.slice(0, -1)) copy(builderPaths.here(src), dest);
    } else if (step.keyword === 'ENV') {
      for (const [k, v] of step.properties) env[k] = paths.here(v);
    } else if (step.keyword === 'RUN') {
      t.diagnostic(`not run (packages, the user, the volume's folder): RUN ${step.text.slice(0, 80)}…`);
    }
  }
  return { env, cwd: cwd ?? runtimeDir, volumes: volumes.map((v) => paths.here(v)) };
}

test('the runtime files serve as a non-root user: migrations, CMD, HEALTHCHECK, SIGTERM', {
  timeout: 300_000,
}, async (t) => {
  assert.ok(existsSync(join(builderDir, 'dist')), "needs the builder stage's output (the test before)");
  const laid = layRuntime(t, runtime);
  const user = last(runtime, 'USER')!.args[0];
  const setpriv = asRoot
    ? ['setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--no-new-privs']
    : [];
  if (asRoot) t.diagnostic(`USER ${user} in the image; nobody here`);
  else t.diagnostic('not root: runs as the current user, not as an unprivileged one');
  const httpPort = await freePort();
  // The container's environment: the image's ENV and what compose sets (here: our Redis and
  // PostgreSQL, our prefix and schema, loopback ports), and no other variable of this process.
  const env = {
    PATH: `${dirname(process.execPath)}:/usr/local/bin:/usr/bin:/bin`,
    ...laid.env,
    REDIS_URL,
    DATABASE_URL,
    GW_REDIS_PREFIX: prefix,
    GW_DB_SCHEMA: schema,
    GW_HOST: '127.0.0.1',
    GW_TCP_PORT: '0',
    GW_METRICS_PORT: '0',
    GW_HTTP_PORT: String(httpPort),
    GW_MIGRATE_ON_START: 'false',
  };
  const as = (argv: string[]) => [...setpriv, ...argv];

  // Compose's one-shot migration service, from the runtime files.
  const compose = parse(readFileSync(join(ROOT, 'deploy/compose.yaml'), 'utf8'));
  const migrate = as(compose.services.migrate.command as string[]);
  const m = await run('the migrations', migrate[0], migrate.slice(1), { cwd: laid.cwd, env }, 60_000);
  assert.equal(m.code, 0, m.out);
  assert.match(m.out, /^up: /m);

  const entrypoint = execForm(last(runtime, 'ENTRYPOINT')!);
  const cmd = execForm(last(runtime, 'CMD')!);
  const withInit = existsSync(entrypoint[0]);
  t.diagnostic(
    withInit
      ? `run under the ENTRYPOINT ${entrypoint.join(' ')}`
      : `${entrypoint[0]} is not on this machine: the CMD runs without it`,
  );
  const argv = as([...(withInit ? entrypoint : []), ...cmd]);
  const proc = spawn(argv[0], argv.slice(1), { cwd: laid.cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  gateway = proc;
  // tini and the gateway under it (its own pid, from its logs) if the runner ends this file.
  killOnRunnerTerm(proc, () => [gatewayPid]);
  const logs: Record<string, unknown>[] = [];
  let stderr = '';
  proc.stderr!.on('data', (d) => {
    stderr += d;
  });
  createInterface({ input: proc.stdout! }).on('line', (line) => {
    try {
      const parsed = JSON.parse(line);
      gatewayPid ??= typeof parsed.pid === 'number' ? parsed.pid : undefined;
      logs.push(parsed);
    } catch {
      logs.push({ msg: line });
    }
  });
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  const ready = await until(
    'the gateway started from the runtime files to log "gateway ready"',
    () => {
      if (proc.exitCode !== null)
        throw new Error(`the gateway exited ${proc.exitCode}: ${stderr.slice(-2000)}`);
      return logs.find((l) => l.msg === 'gateway ready');
    },
    60_000,
  );
  assert.equal(ready.httpPort, httpPort);
  // The addon the builder built is where the compiled code looks for it.
  assert.equal(logs.find((l) => l.msg === 'crypto backend')?.backend, 'native');
  t.diagnostic(`postgres driver: ${logs.find((l) => l.msg === 'postgres driver')?.driver}`);

  const r = await fetchWithin(`http://127.0.0.1:${httpPort}/health/ready`);
  const body = (await r.json()) as { checks: Record<string, string> };
  assert.equal(r.status, 200, JSON.stringify(body));
  assert.equal(body.checks.migrations, 'ok', 'the build carries its migrations');

  // The identity was created in the key folder (the VOLUME), 0600, by the gateway's user.
  const identity = laid.env.GW_IDENTITY_FILE;
  assert.ok(identity.startsWith(`${laid.volumes[0]}/`), `GW_IDENTITY_FILE (${identity}) is on the volume`);
  const st = statSync(identity);
  assert.equal(st.mode & 0o777, 0o600);
  if (asRoot) assert.equal(st.uid, NOBODY);
  assert.ok(existsSync(laid.env.GW_JWT_KEY_FILE), 'existsSync(laid.env.GW_JWT_KEY_FILE)');

  const check = as(execForm(last(runtime, 'HEALTHCHECK')!));
  const healthy = await run('the HEALTHCHECK', check[0], check.slice(1), { cwd: laid.cwd, env }, 30_000);
  assert.equal(healthy.code, 0, healthy.out);

  proc.kill('SIGTERM');
  assert.equal(await within('the gateway to exit after SIGTERM', exited, 60_000), 0, stderr.slice(-2000));
  assert.ok(
    logs.some((l) => l.msg === 'shutdown complete'),
    "logs.some((l) => l.msg === 'shutdown complete')",
  );

  const down = await run('the HEALTHCHECK', check[0], check.slice(1), { cwd: laid.cwd, env }, 30_000);
  assert.notEqual(down.code, 0, 'the HEALTHCHECK fails when nothing serves');
});
