/**
 * Virtual devices against a real gateway: a device whose `register` reached the gateway but
 * whose answer was lost (the connection dropped under it) finds its username taken on the
 * next try, and must log in to its own account instead of failing forever.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { PASSWORD, VirtualDevice } from '../../bench/sim/device.ts';
import { rngFor } from '../../bench/sim/rng.ts';
import { GatewayClient } from '../../client/client.ts';
import { newName } from '../helpers/accounts.ts';
import { DATABASE_URL } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { deviceLink } from '../helpers/device-link.ts';
import { type GatewayProcess, SLOW_HASH_ENV, startGateway } from '../helpers/gateway-process.ts';
import { deviceContext } from '../helpers/sim-device.ts';

let gw: GatewayProcess;

before(async () => {
  gw = await startGateway({ GW_REGISTER_PER_MINUTE: '10000', GW_LOG_LEVEL: 'info' });
});

after(async () => {
  await gw?.stop();
});

test('a device whose earlier register went through logs in when its username is taken', async () => {
  const username = newName().slice(0, 16);
  // The register of an earlier attempt, whose answer the device never saw.
  const earlier = new GatewayClient({ url: gw.tcpUrl });
  await within('the earlier connection', earlier.connect());
  await within(
    'the earlier register',
    earlier.request('register', { username, email: `${username}@sim.example`, password: PASSWORD }),
  );
  await earlier.close();

  const { ctx, stop } = deviceContext();
  const d = new VirtualDevice(0, username, gw.tcpUrl, rngFor(1, 1), ctx);
  try {
    void d.start();
    await until('the device to log in', () => d.ready, 15_000).catch((e) => {
      throw new Error(`${(e as Error).message}; errors: ${JSON.stringify(ctx.metrics.errors)}`);
    });
    assert.equal(ctx.metrics.login.count, 1);
    assert.ok(d.session?.sessionId, 'd.session?.sessionId');
  } finally {
    stop();
    await within('the device to stop', d.stop());
  }
});

test('a device whose own register made the account but lost its answer counts the retry as found made, not as an error', async () => {
  const slow = await startGateway({ ...SLOW_HASH_ENV, GW_REGISTER_PER_MINUTE: '10000', GW_DEFAULT_ROOM: '' });
  const link = await deviceLink(slow.tcpUrl);
  const pool = new pg.Client({ connectionString: DATABASE_URL });
  const username = newName().slice(0, 16);
  const { ctx, stop } = deviceContext();
  const d = new VirtualDevice(0, username, link.url, rngFor(3, 1), ctx);
  try {
    await within('a database connection', pool.connect());
    // The first connection: `hello`, then the register, whose answer is held; the connection
    // is cut once the account exists.
    const held = link.holdAfter(2);
    void d.start();
    const cut = await within("the device's register", held);
    await until('the register to make the account', async () => {
      const r = await within(
        'the account looked up',
        pool.query(`SELECT 1 FROM ${slow.schema}.users WHERE username = $1`, [username]),
      );
      return r.rowCount === 1;
    });
    cut();
    await until('the device to log in', () => d.ready, 30_000).catch((e) => {
      throw new Error(`${(e as Error).message}; errors: ${JSON.stringify(ctx.metrics.errorsByStep)}`);
    });
    assert.equal(ctx.metrics.registersFoundMade, 1, 'the retry found the account made');
    assert.equal(
      ctx.metrics.errors.username_taken,
      undefined,
      `username_taken is not an error here: ${JSON.stringify(ctx.metrics.errorsByStep)}`,
    );
  } finally {
    stop();
    await within('the device to stop', d.stop());
    await within('the proxy closed', link.close());
    await within('the database connection closed', pool.end()).catch(() => undefined);
    await slow.stop();
  }
});

test('a device whose username belongs to someone else stops trying, with the error counted', async () => {
  const username = newName().slice(0, 16);
  const other = new GatewayClient({ url: gw.tcpUrl });
  await within('the other connection', other.connect());
  await within(
    "the other account's register",
    other.request('register', {
      username,
      email: `${username}@other.example`,
      password: 'another password 1',
    }),
  );
  await other.close();

  const { ctx, stop } = deviceContext();
  const d = new VirtualDevice(0, username, gw.tcpUrl, rngFor(1, 1), ctx);
  try {
    await within('the device start', d.start());
    await until('the error to be counted', () => ctx.metrics.errors.invalid_credentials === 1).catch((e) => {
      throw new Error(`${(e as Error).message}; errors: ${JSON.stringify(ctx.metrics.errors)}`);
    });
    assert.equal(d.ready, false);
    // No retry loop: the device gave up after the one attempt.
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(ctx.metrics.errors.invalid_credentials, 1, JSON.stringify(ctx.metrics.errors));
    assert.deepEqual(
      ctx.metrics.errorsByStep,
      { register: { username_taken: 1 }, login: { invalid_credentials: 1 } },
      'each counted under the step that met it',
    );
  } finally {
    stop();
    await within('the device to stop', d.stop());
  }
});

test('a device told to retry later (rate_limited with retryAfter) waits that long instead of hammering', async () => {
  // A gateway that allows one register per minute from this address: the second device is
  // told `rate_limited` with a retryAfter of many seconds.
  const strict = await startGateway({ GW_REGISTER_PER_MINUTE: '1', GW_LOG_LEVEL: 'info' });
  const { ctx, stop } = deviceContext();
  const first = new VirtualDevice(0, newName().slice(0, 16), strict.tcpUrl, rngFor(2, 1), ctx);
  const second = new VirtualDevice(1, newName().slice(0, 16), strict.tcpUrl, rngFor(2, 2), ctx);
  try {
    await within('the first device', first.start());
    assert.ok(first.ready, JSON.stringify(ctx.metrics.errors));
    await within('the second device', second.start());
    assert.equal(ctx.metrics.errors.rate_limited, 1, JSON.stringify(ctx.metrics.errors));
    // Within the next 3 s a device backing off from its own failures would have tried again
    // several times (100 ms, 200 ms, 400 ms, ...); one that heeds retryAfter has not.
    await new Promise((r) => setTimeout(r, 3000));
    assert.equal(ctx.metrics.errors.rate_limited, 1, JSON.stringify(ctx.metrics.errors));
    assert.deepEqual(
      ctx.metrics.errorsByStep,
      { register: { rate_limited: 1 } },
      'a refused register is told apart from a refused login',
    );
  } finally {
    stop();
    await within('the devices to stop', Promise.all([first.stop(), second.stop()]));
    await strict.stop();
  }
});

test('a device whose session was revoked while it was away logs in again, with the session counted lost', async () => {
  const { ctx, stop } = deviceContext();
  const username = newName().slice(0, 16);
  const d = new VirtualDevice(0, username, gw.tcpUrl, rngFor(3, 1), ctx);
  const other = new GatewayClient({ url: gw.tcpUrl });
  try {
    await within('the device start', d.start());
    assert.ok(d.ready, `the device logged in: ${JSON.stringify(ctx.metrics.errors)}`);
    const first = d.session?.sessionId;
    assert.ok(first, 'a first session');
    // The owner revokes the device's session from another connection: the device is kicked,
    // and its resume of that session is refused (`session_revoked`) from then on.
    await within('the other connection', other.connect());
    await within('the other login', other.request('login', { username, password: PASSWORD }));
    await within('the revoke', other.request('revoke', { sessionId: first }));
    await until(
      'the device back with a new session',
      () => d.ready && d.session !== undefined && d.session.sessionId !== first,
      15_000,
    ).catch((e) => {
      throw new Error(
        `${(e as Error).message}; errors: ${JSON.stringify(ctx.metrics.errors)}, logins ${ctx.metrics.login.count}`,
      );
    });
    assert.equal(ctx.metrics.sessionsLost, 1, 'the revoked session counted lost');
    assert.equal(ctx.metrics.login.count, 2, 'logged in twice: at the start and after the loss');
    assert.ok((ctx.metrics.errors.session_revoked ?? 0) >= 1, JSON.stringify(ctx.metrics.errors));
  } finally {
    stop();
    await within('the other connection closed', other.close());
    await within('the device to stop', d.stop());
  }
});
