// `npm run build` (run by `npm ci` through `prepare`): compile gateway/, protocol/ and client/
// to dist/ with tsc, then copy what the compiled code loads by path at run time: the Lua
// scripts, the hashing worker, the migrations and the .proto files. Paths in dist/ mirror the
// sources', so every `new URL('…', import.meta.url)` resolves the same way there.
import { execFileSync } from 'node:child_process';
import { cpSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');
rmSync(dist, { recursive: true, force: true });
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json')], {
  stdio: 'inherit',
  cwd: root,
});
for (const dir of ['gateway/delivery/lua', 'gateway/messaging/lua', 'workers', 'migrations', 'proto']) {
  cpSync(join(root, dir), join(dist, dir), { recursive: true });
}
console.log('built dist/');
