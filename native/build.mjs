// Builds the native crypto addon during `npm ci` (node-gyp, against Node's own headers). A
// failed build never fails the install: the gateway then runs on node:crypto and says so.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const local = join(here, '..', 'node_modules', '.bin', 'node-gyp');
// Build against the headers of the Node that runs us (no download): npm's nodedir setting if
// given, else the include/node folder next to this Node (as Debian and the official tarballs have).
const prefix = dirname(dirname(process.execPath));
const nodedir =
  process.env.npm_config_nodedir || (existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? prefix : '');
const gypArgs = ['rebuild', ...(nodedir ? [`--nodedir=${nodedir}`] : [])];
const [cmd, args] = existsSync(local)
  ? [local, gypArgs]
  : ['npm', ['exec', '--yes', 'node-gyp', '--', ...gypArgs]];
const r = spawnSync(cmd, args, { cwd: here, stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
if (r.status === 0) {
  console.log('native crypto addon built (native/build/Release/gw_crypto.node)');
} else {
  console.warn(
    `warning: the native crypto addon did not build; the gateway will use node:crypto.\n${(r.stderr || r.error?.message || '').slice(-2000)}`,
  );
}
