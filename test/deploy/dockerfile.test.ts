/**
 * The Dockerfile read as data (no image is built here: no registry can be reached): valid
 * instructions, a builder and a slim runtime stage on Node 20, a non-root user, the liveness
 * HEALTHCHECK, the ports and key files of gateway/config.ts, COPY sources that exist, and a
 * .dockerignore that keeps host builds and secrets out of the context. The dry run of its
 * commands is image-dry-run.test.ts.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join, posix } from 'node:path';
import { test } from 'node:test';
import { validate } from 'dockerfile-utils';
import { parse } from 'yaml';
import { CONFIG_ENV_NAMES, loadConfig } from '../../gateway/config.ts';
import { contextFilter, execForm, last, ROOT, readDockerfile, stageEnv } from '../helpers/dockerfile.ts';

const { text, stages } = readDockerfile();
const builder = stages[0];
const runtime = stages.at(-1)!;
const defaults = loadConfig({});

test('the Dockerfile has no instruction the Docker language service rejects', () => {
  const problems = validate(text).map((d) => `line ${d.range.start.line + 1}: ${d.message}`);
  assert.deepEqual(problems, []);
});

test('two stages on the official Node 20 Debian slim image: a builder and the runtime', () => {
  assert.ok(stages.length >= 2, 'multi-stage');
  for (const s of stages) assert.equal(s.image, 'node:20-bookworm-slim', `stage ${s.name}`);
  const fromBuilder = runtime.steps.filter((s) => s.keyword === 'COPY' && s.flags.from === builder.name);
  assert.ok(fromBuilder.length > 0, 'the runtime stage copies from the builder');
  assert.ok(
    !runtime.steps.some((s) => s.keyword === 'COPY' && !s.flags.from),
    'the runtime stage takes nothing from the build context: only what the builder built',
  );
});

test('the builder installs the toolchain for the addon and pg-native, runs npm ci, prunes dev dependencies', () => {
  const runs = builder.steps.filter((s) => s.keyword === 'RUN').map((s) => s.text);
  const apt = runs.find((r) => r.includes('apt-get install'));
  assert.ok(apt, 'an apt-get install in the builder');
  for (const pkg of ['python3', 'make', 'g++', 'libpq-dev'])
    assert.match(apt, new RegExp(`\\s${pkg.replace('+', '\\+')}(\\s|$)`));
  const build = runs.find((r) => /\bnpm ci\b/.test(r));
  assert.ok(build, 'npm ci');
  assert.match(build, /npm prune --omit=dev/);
  assert.ok(
    build.indexOf('npm ci') < build.indexOf('npm prune'),
    "build.indexOf('npm ci') < build.indexOf('npm prune')",
  );
  // The addon's build never fails npm ci (native/build.mjs): the image must check it loads.
  assert.match(build, /require\('\.\/native\/build\/Release\/gw_crypto\.node'\)/);
});

test('the runtime runs as a non-root user, with libpq5 and tini, the CMD on the built gateway', () => {
  const user = last(runtime, 'USER');
  assert.ok(user, 'a USER in the final stage');
  const [uid] = user.args[0].split(':');
  assert.ok(uid !== 'root' && uid !== '0', `USER ${user.args[0]} is not root`);
  const apt = runtime.steps.find((s) => s.keyword === 'RUN' && s.text.includes('apt-get install'));
  assert.ok(apt, 'an apt-get install in the runtime stage');
  assert.match(apt.text, /\slibpq5(\s|$)/);
  assert.match(apt.text, /\stini(\s|$)/);
  if (/^\d+$/.test(uid))
    assert.match(apt.text, new RegExp(`useradd [^&]*--uid ${uid}\\b`), 'the user exists');
  assert.deepEqual(execForm(last(runtime, 'ENTRYPOINT')!), ['/usr/bin/tini', '--']);
  const cmd = execForm(last(runtime, 'CMD')!);
  assert.deepEqual(cmd, ['node', 'dist/gateway/main.js']);
  assert.ok(existsSync(join(ROOT, 'gateway/main.ts')), 'dist/gateway/main.js is built from gateway/main.ts');
  assert.equal(last(runtime, 'STOPSIGNAL')?.args[0], 'SIGTERM');
});

test("EXPOSE lists the gateway's default TCP, HTTP and metrics ports", () => {
  const exposed = runtime.steps.filter((s) => s.keyword === 'EXPOSE').flatMap((s) => s.args.map(Number));
  for (const p of [defaults.tcpPort, defaults.httpPort, defaults.metricsPort])
    assert.ok(exposed.includes(p), `port ${p}`);
});

test('the HEALTHCHECK asks /health/live with node, and compose runs the same check', () => {
  const hc = last(runtime, 'HEALTHCHECK');
  assert.ok(hc, 'a HEALTHCHECK');
  const argv = execForm(hc);
  assert.equal(argv[0], 'node', 'node: the slim image has no curl');
  assert.match(argv.join(' '), /\/health\/live\b/);
  assert.match(argv.join(' '), /process\.env\.GW_HTTP_PORT \|\| 8080/);
  assert.equal(defaults.httpPort, 8080);
  const compose = parse(readFileSync(join(ROOT, 'deploy/compose.yaml'), 'utf8'));
  assert.deepEqual(compose.services.gateway.healthcheck.test, ['CMD', ...argv]);
});

test('ENV sets only real settings, and the key files are on a volume', () => {
  const env = stageEnv(runtime);
  for (const name of Object.keys(env)) {
    assert.ok(
      name === 'NODE_ENV' || CONFIG_ENV_NAMES.includes(name),
      `${name} is a setting of gateway/config.ts`,
    );
  }
  loadConfig(env);
  const volumes = runtime.steps
    .filter((s) => s.keyword === 'VOLUME')
    .flatMap((s) => (s.text.trim().startsWith('[') ? (JSON.parse(s.text) as string[]) : s.args));
  for (const key of ['GW_IDENTITY_FILE', 'GW_JWT_KEY_FILE']) {
    assert.ok(env[key]?.startsWith('/'), `${key} is an absolute path`);
    assert.ok(volumes.includes(posix.dirname(env[key])), `${key}'s folder is a VOLUME`);
  }
  const setup = runtime.steps.find((s) => s.keyword === 'RUN' && s.text.includes('install -d'));
  assert.match(
    setup?.text ?? '',
    new RegExp(`install -d -o \\w+ -g \\w+ -m 0700 ${posix.dirname(env.GW_IDENTITY_FILE)}`),
  );
});

test("every COPY source exists: the context's files, and the builder's outputs in a built tree", () => {
  const ignore = contextFilter();
  const workdir = last(builder, 'WORKDIR')!.args[0];
  for (const s of stages.flatMap((st) => st.steps.filter((x) => x.keyword === 'COPY'))) {
    const sources = s.args.slice(0, -1);
    for (const src of sources) {
      if (s.flags.from) {
        assert.equal(s.flags.from, builder.name);
        assert.ok(src.startsWith(`${workdir}/`), `${src} is in the builder's ${workdir}`);
        // The built tree of this checkout stands for the builder's (npm ci builds both).
        const local = join(ROOT, posix.relative(workdir, src));
        assert.ok(existsSync(local), `${src} (${local} here) exists after npm ci`);
      } else if (src !== '.') {
        assert.ok(existsSync(join(ROOT, src)), `${src} exists`);
        assert.ok(!ignore.ignores(src), `${src} is not excluded by .dockerignore`);
      }
    }
  }
});

test('.dockerignore keeps host builds and secrets out, and what the build needs in', () => {
  const ignore = contextFilter();
  for (const p of [
    'node_modules/pg/package.json',
    'dist/gateway/main.js',
    '.git/HEAD',
    'native/build/Release/gw_crypto.node',
    '.data/identity.pem',
    '.env',
  ]) {
    assert.ok(ignore.ignores(p), `${p} is excluded`);
  }
  const build = JSON.parse(readFileSync(join(ROOT, 'tsconfig.build.json'), 'utf8')) as { include: string[] };
  const needed = [
    'package.json',
    'package-lock.json',
    'tsconfig.json',
    'tsconfig.build.json',
    'scripts/build.mjs',
    'native/build.mjs',
    'native/binding.gyp',
    'native/src/gw_crypto.cc',
    'workers',
    'migrations',
    'gateway/delivery/lua',
    ...build.include,
  ];
  for (const p of needed) {
    assert.ok(existsSync(join(ROOT, p)), `${p} exists`);
    assert.ok(!ignore.ignores(p), `${p} is in the context`);
  }
});
