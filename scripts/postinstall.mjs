// Applies patches/ to the installed dependencies with patch-package, after `npm ci` in a
// checkout of the gateway. Not when another project installs the gateway as a dependency (its
// back-end publisher or client library): there patch-package, a dev dependency, is not
// installed, the dependencies may be hoisted out of its reach, and nothing needs the patch to
// work (it makes msgpackr's string writing faster: docs/ARCHITECTURE.md, "The hot path").
// In a checkout, a patch that no longer applies fails the install (`--error-on-fail`).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
if (root.split(sep).includes('node_modules')) process.exit(0);

const bin = join(root, 'node_modules', '.bin', 'patch-package');
if (!existsSync(bin)) {
  console.warn(
    'warning: patch-package is not installed (dev dependencies omitted?): the dependencies run unpatched (patches/)',
  );
  process.exit(0);
}
const r = spawnSync(bin, ['--error-on-fail'], { cwd: root, stdio: 'inherit' });
process.exit(r.status ?? 1);
