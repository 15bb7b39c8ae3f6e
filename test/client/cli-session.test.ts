/**
 * The interactive client through a pipe when the connection goes: after a gateway restart,
 * `--reconnect` resumes the session and joins its rooms again (the current room stays
 * current); after a takeover or a revoke it says what happened and exits 1, without trying to
 * reconnect (which would take the session back, or fail).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, newName, PASSWORD } from '../helpers/accounts.ts';
import { startCli } from '../helpers/cli-process.ts';
import { nextEvent } from '../helpers/deadline.ts';
import { deploymentEnv, dropDeployment, startGateway } from '../helpers/gateway-process.ts';
import { freePort } from '../helpers/net.ts';

/** Registers a user over a plain client. */
async function register(url: string): Promise<string> {
  const name = newName();
  const c = await connected(url);
  try {
    await c.request('register', { username: name, email: `${name}@example.com`, password: PASSWORD });
  } finally {
    await c.close();
  }
  return name;
}

test('--reconnect: after a gateway restart the session is resumed and its rooms joined again', async () => {
  const port = await freePort();
  const deployment = deploymentEnv();
  const env = { ...deployment, GW_TCP_PORT: String(port), GW_RECONNECT_JITTER_MS: '300' };
  const url = `tcp://127.0.0.1:${port}`;
  let a = await startGateway(env);
  const cli = startCli([url, '--reconnect']);
  try {
    const name = await register(url);
    cli.send(`login ${name} '${PASSWORD}'`);
    cli.send('/join #ops');
    cli.send('/join #dev');
    cli.send('/join #ops');
    await cli.waitFor(/\*\*\* You joined #dev \*\*\*\n[\s\S]*\*\*\* You joined #ops \*\*\*/, 'the joins');
    cli.send('said before the restart');
    await cli.waitFor(new RegExp(`^\\[${name}\\]: said before the restart$`, 'm'), 'the message in #ops');

    await a.stop();
    await cli.waitFor(/\*\*\* The gateway is shutting down/, 'the going_away kick');
    const mark = cli.out().length;
    a = await startGateway(env);
    await cli.waitFor(
      /^\*\*\* Reconnected; rejoined #general, #ops, #dev \*\*\*$/m,
      'the reconnection and the rejoins',
      mark,
      60_000,
    );

    // The rejoin replayed #ops's recent history (before its answer): what was shown is not shown again.
    assert.equal(
      cli.out().match(/: said before the restart( \(history\))?$/gm)?.length,
      1,
      'the replay is deduplicated',
    );

    // The rooms are really joined on the new connection, and #ops is still current.
    const watcherName = await register(url);
    const watcher = await connected(url);
    await watcher.request('login', { username: watcherName, password: PASSWORD });
    await watcher.request('join', { room: '#ops' });
    const said = nextEvent<EventMsg>(watcher, 'event', 'the message said in #ops after the reconnection');
    cli.send('back in ops');
    const e = await said;
    assert.equal(e.room, '#ops');
    assert.equal(e.from, name);
    assert.deepEqual(e.data, { body: 'back in ops' });
    cli.send('/rooms');
    await cli.waitFor(/^ {2}- #ops \(2 members\) \(current\)$/m, '/rooms after the reconnection', mark);
    await cli.waitFor(/^ {2}- #dev \(1 member\)$/m, '#dev joined again', mark);
    await watcher.close();
    cli.send('/quit');
    assert.equal(await cli.exited(), 0, cli.out());
  } finally {
    cli.kill();
    await a.stop();
    await dropDeployment(deployment);
  }
});

test('a takeover ends the client with a clear message and status 1, even with --reconnect', async () => {
  const gw = await startGateway();
  const cli = startCli([gw.tcpUrl, '--reconnect', '--device-id', 'tv-1']);
  try {
    const name = await register(gw.tcpUrl);
    cli.send(`login ${name} '${PASSWORD}'`);
    await cli.waitFor(/\*\*\* You joined #general \*\*\*/, 'the login');
    const other = await connected(gw.tcpUrl);
    await other.request('login', { username: name, password: PASSWORD, device: { id: 'tv-1' } });
    await cli.waitFor(/^\*\*\* Disconnected: your session was taken over by a newer login/m, 'the takeover');
    assert.equal(await cli.exited(), 1);
    assert.doesNotMatch(cli.out(), /Reconnecting/, 'no tug of war with the newer login');
    await other.close();
  } finally {
    cli.kill();
    await gw.stop();
  }
});

test('a revoked session ends the client with a clear message and status 1', async () => {
  const gw = await startGateway();
  const cli = startCli([gw.tcpUrl]);
  try {
    const name = await register(gw.tcpUrl);
    cli.send(`login ${name} '${PASSWORD}'`);
    await cli.waitFor(/\*\*\* You joined #general \*\*\*/, 'the login');
    const other = await connected(gw.tcpUrl);
    await other.request('login', { username: name, password: PASSWORD });
    const { sessions } = await other.request<{ sessions: { sessionId: string; current: boolean }[] }>(
      'sessions',
    );
    const target = sessions.find((s) => !s.current);
    assert.ok(target, 'the client session is listed');
    await other.request('revoke', { sessionId: target.sessionId });
    await cli.waitFor(/^\*\*\* Disconnected: your session was ended/m, 'the revoke');
    assert.equal(await cli.exited(), 1);
    await other.close();
  } finally {
    cli.kill();
    await gw.stop();
  }
});
