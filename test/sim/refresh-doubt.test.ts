/**
 * A simulated device whose refresh is left in doubt keeps its session. The device makes a new
 * client for each connection; the refresh's answer is lost (its connection cut after the
 * gateway rotated the token, before the answer reached the device), and the gateway gives the
 * same pair back only within its grace period (PROTOCOL.md §4). The device comes back after a
 * streak of refused connections, its backoff at its 5 s cap, longer than the grace period (2 s
 * here, on the gateway and in the device's context): it must present the refresh in doubt again,
 * first and within a quarter of the grace period, or it holds a rotated refresh token and loses
 * its session to `refresh_reused`.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { VirtualDevice } from '../../bench/sim/device.ts';
import { rngFor } from '../../bench/sim/rng.ts';
import type { Session } from '../../client/client.ts';
import { hashToken } from '../../gateway/auth/tokens.ts';
import { newName } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { deviceLink } from '../helpers/device-link.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { deviceContext } from '../helpers/sim-device.ts';

const GRACE_S = 2;

let gw: GatewayProcess;

before(async () => {
  gw = await startGateway({
    ACCESS_TOKEN_TTL: '10',
    GW_REFRESH_GRACE_SECONDS: String(GRACE_S),
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    GW_LOG_LEVEL: 'info',
  });
});

after(async () => {
  await gw?.stop();
});

test('a refresh whose answer was lost is presented again within the grace period: the device keeps its session', async () => {
  const redis = redisClient();
  const link = await deviceLink(gw.tcpUrl);
  const { ctx, stop } = deviceContext({ refreshGraceMs: GRACE_S * 1000 });
  const d = new VirtualDevice(0, newName().slice(0, 16), link.url, rngFor(7, 1), ctx);
  const errors = () => JSON.stringify(ctx.metrics.errors);
  try {
    void d.start();
    await until('the device to log in', () => d.ready, 15_000);
    const s0: Session = { ...d.session! };
    assert.ok(s0.refresh, 'the login gave a refresh token');

    // The gateway out of reach: the device's attempts fail, and its backoff grows to its cap.
    link.refuse = true;
    d.drop();
    await until(
      'six refused connections and the access token expired',
      () => link.refused >= 6 && Date.now() > s0.expiresAt + 200,
      30_000,
    );
    // Back: the next connection is `hello`, `resume` (token_expired), then the `refresh`, whose
    // answer is held, and the connection cut once the gateway has rotated the token.
    const held = link.holdAfter(3);
    link.refuse = false;
    const cut = await within("the device's refresh on its next connection", held, 30_000);
    await until('the refresh to rotate the token on the gateway', () =>
      redis.exists(`${gw.prefix}rtu:${hashToken(s0.refresh!)}`),
    );
    cut();

    await until(
      'the device to resume, or to lose its session to refresh_reused',
      () => d.ready || ctx.metrics.errors.refresh_reused,
      30_000,
    );
    assert.equal(ctx.metrics.errors.refresh_reused, undefined, `no refresh_reused: errors ${errors()}`);
    const s = d.session!;
    assert.equal(s.sessionId, s0.sessionId, 'the same session resumed');
    assert.ok(s.refresh && s.refresh !== s0.refresh, 'the device holds a new refresh token');
    assert.equal(
      await redis.get(`${gw.prefix}rt:${hashToken(s.refresh)}`),
      s0.sessionId,
      "the device's refresh token is the session's current one",
    );
    const list = await within(
      'an authenticated request after the resume',
      d.client!.request<{ sessions: { sessionId: string; current: boolean }[] }>('sessions'),
    );
    assert.equal(
      list.sessions.find((x) => x.current)?.sessionId,
      s0.sessionId,
      'the connection is authenticated as the session',
    );
    assert.equal(ctx.metrics.refreshesInDoubt, 1, `one refresh presented again in doubt: errors ${errors()}`);
  } finally {
    stop();
    await within('the device to stop', d.stop());
    await within('the proxy closed', link.close());
    redis.disconnect();
  }
});
