/**
 * The benches measure what `npm start` runs: the tsc build in dist/, not the sources through
 * tsx (whose esbuild output keeps function names with a `__name` call for every closure made,
 * ~2% of the gateway's CPU in a CPU profile of the device-to-device bench). `useBuiltGateway()`
 * runs `npm run build` when dist/ is missing or older than a source, then has the test helper's
 * `startGateway` run dist/gateway/main.js (`GATEWAY_ENTRY=dist`).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
/** What the build compiles or copies (scripts/build.mjs). */
const SOURCES = ['gateway', 'protocol', 'client', 'workers', 'migrations', 'proto', 'tsconfig.build.json'];

function newestMtime(path: string): number {
  const st = statSync(path);
  if (!st.isDirectory()) return st.mtimeMs;
  let newest = st.mtimeMs;
  for (const name of readdirSync(path)) newest = Math.max(newest, newestMtime(join(path, name)));
  return newest;
}

export function useBuiltGateway(): void {
  const main = join(ROOT, 'dist', 'gateway', 'main.js');
  const sources = Math.max(
    ...SOURCES.map((s) => join(ROOT, s))
      .filter(existsSync)
      .map(newestMtime),
  );
  if (!existsSync(main) || statSync(main).mtimeMs < sources) {
    process.stderr.write('building dist/ (npm run build): the benches run the built gateway\n');
    execFileSync('npm', ['run', '-s', 'build'], { cwd: ROOT, stdio: ['ignore', 'ignore', 'inherit'] });
  }
  process.env.GATEWAY_ENTRY = 'dist';
}
