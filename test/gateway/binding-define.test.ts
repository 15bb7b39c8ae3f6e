/**
 * The binding's operations are named by the services that define them (gateway/binding.ts): a
 * name defined again with other Lua is refused at once. It used to be ignored, so the second
 * service's calls ran the first's operation (found when presence's start named an operation
 * `node_release`, which delivery had named so already: WRONGTYPE at run time). A node's start
 * defines every service's operations on its one binding, so a clash now fails every start.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SessionBinding } from '../../gateway/binding.ts';
import { redisClient } from '../helpers/cleanup.ts';

test('an operation name defined twice with different Lua is refused; with the same Lua it is one operation', () => {
  const r = redisClient(undefined, { lazyConnect: true });
  try {
    const b = new SessionBinding(r);
    b.define('op_a', 'return 1');
    b.define('op_a', 'return 1');
    assert.throws(() => b.define('op_a', 'return 2'), /op_a defined twice, differently/);
  } finally {
    r.disconnect();
  }
});
