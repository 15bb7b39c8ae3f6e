/**
 * A PostgreSQL that answers but takes no write: a standby, or a failover's old primary still
 * reached through the pool's open connections (here `default_transaction_read_only` turned on
 * under them). Registrations and logins are answered `overloaded` with retryAfter, not
 * `internal`; the node says once that PostgreSQL is down, naming why, and stays ready, degraded;
 * nothing is logged as an error; once it takes writes again, the refused registration succeeds.
 * The PostgreSQL is a private server of this file.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, within } from '../helpers/deadline.ts';
import { assertNoErrorLines, type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type OwnPostgres, startOwnPostgres } from '../helpers/own-postgres.ts';

let db: OwnPostgres;
let gw: GatewayProcess;
const closers: (() => Promise<unknown>)[] = [];

before(async () => {
  db = await startOwnPostgres();
  gw = await startGateway({ DATABASE_URL: db.url, GW_REGISTER_PER_MINUTE: '1000', GW_DEFAULT_ROOM: '' });
});
after(async () => {
  for (const c of closers.reverse()) await c().catch(() => {});
  await gw?.stop();
  await db?.remove();
});

/** Waits for the node's `dependency down` / `dependency recovered` line about PostgreSQL, logged after `since`. */
function postgresLine(msg: 'dependency down' | 'dependency recovered', since: number) {
  return within(
    `the ${msg} line`,
    gw.waitForLog((l) => gw.logs.indexOf(l) >= since && l.msg === msg && l.dependency === 'postgres', 10000),
    11000,
  );
}

function readOnly(on: boolean): Promise<void> {
  return within(`default_transaction_read_only ${on ? 'on' : 'off'}`, setReadOnly(on));
}

async function setReadOnly(on: boolean): Promise<void> {
  const admin = new pg.Client({ connectionString: db.url });
  await admin.connect();
  try {
    await admin.query(
      on
        ? 'ALTER SYSTEM SET default_transaction_read_only = on'
        : 'ALTER SYSTEM RESET default_transaction_read_only',
    );
    await admin.query('SELECT pg_reload_conf()');
  } finally {
    await admin.end();
  }
}

test('a read-only PostgreSQL: registrations and logins answered overloaded, the node says why and stays ready, degraded; afterwards the refused registration succeeds', async () => {
  const device = await connected(gw.tcpUrl);
  closers.push(() => device.close());
  const { username } = await signUp(device);
  const since = gw.logs.length;
  await readOnly(true);
  const down = await postgresLine('dependency down', since);
  assert.match(String(down.err), /read-only/, `it names why: ${down.err}`);
  const ready = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/health/ready`);
  const body = (await ready.json()) as { degraded?: string[] };
  assert.equal(ready.status, 200, JSON.stringify(body));
  assert.ok(body.degraded?.includes('postgres'), `degraded: ${JSON.stringify(body)}`);

  const newcomer = await connected(gw.tcpUrl);
  closers.push(() => newcomer.close());
  const name = newName();
  const registration = () =>
    newcomer.request('register', { username: name, email: `${name}@example.com`, password: PASSWORD });
  for (const [what, p] of [
    ['a registration', registration],
    ['a login', () => newcomer.request('login', { username, password: PASSWORD })],
  ] as const) {
    let refused: { code?: string; retryAfter?: number } | undefined;
    try {
      await within(what, p());
    } catch (e) {
      refused = e as { code?: string; retryAfter?: number };
    }
    assert.equal(refused?.code, 'overloaded', `${what}: ${JSON.stringify(refused)}`);
    assert.ok((refused?.retryAfter ?? 0) > 0, `${what}: a retryAfter`);
  }
  assertNoErrorLines(gw, since);

  const back = gw.logs.length;
  await readOnly(false);
  await postgresLine('dependency recovered', back);
  await within('the refused registration made again', registration());
  await within('a login', newcomer.request('login', { username: name, password: PASSWORD }));
});

test("a read-only PostgreSQL under many requests at once: every registration overloaded and every login overloaded (or locked by the account's attempts in flight), none half done, no connection kept; afterwards each made once", async () => {
  const known = await connected(gw.tcpUrl);
  closers.push(() => known.close());
  const { username } = await signUp(known);
  const devices = await Promise.all(Array.from({ length: 6 }, () => connected(gw.tcpUrl)));
  for (const d of devices) closers.push(() => d.close());
  const names = Array.from({ length: 30 }, newName);
  // The same name twice, from two connections: afterwards exactly one of them makes it.
  const requests = [...names, names[0]].map((name, i) => ({ name, device: devices[i % devices.length] }));
  const register = ({ name, device }: (typeof requests)[number]) =>
    device.request('register', { username: name, email: `${name}@example.com`, password: PASSWORD });
  const login = (i: number) => devices[i % devices.length].request('login', { username, password: PASSWORD });
  const outcome = (p: Promise<unknown>) =>
    p.then(
      () => ({ code: 'ok' }) as { code?: string; retryAfter?: number },
      (e) => e as { code?: string; retryAfter?: number },
    );

  const since = gw.logs.length;
  await readOnly(true);
  await postgresLine('dependency down', since);
  const outcomes = await within(
    'the answers to 31 registrations and 12 logins at once',
    Promise.all([
      ...requests.map((r) => outcome(register(r))),
      ...Array.from({ length: 12 }, (_, i) => outcome(login(i))),
    ]),
  );
  // A login may also be refused `locked` for the account's attempts in flight (more than
  // GW_LOCKOUT_ATTEMPTS of the twelve reach its budget at once: docs/PROTOCOL.md, "Login limits
  // count attempts in flight"), with a retryAfter of about one verification; nothing else.
  const wrong = outcomes.filter(
    (o, i) =>
      !(o.code === 'overloaded' || (i >= requests.length && o.code === 'locked')) ||
      !((o.retryAfter ?? 0) > 0),
  );
  assert.deepEqual(wrong, [], 'every request answered overloaded (or a login locked) with a retryAfter');
  assertNoErrorLines(gw, since);

  const admin = new pg.Client({ connectionString: db.url });
  await within('an admin connection', admin.connect());
  closers.push(() => admin.end());
  const made = await within(
    'the refused names looked up',
    admin.query(`SELECT count(*)::int AS n FROM ${gw.schema}.users WHERE username = ANY($1)`, [names]),
  );
  assert.equal(made.rows[0].n, 0, 'no refused registration made an account');
  // Every connection that met the read-only server was closed, not kept: the gateway's own
  // connections are at most its pool.
  const open = await within(
    'the server connections counted',
    admin.query(
      `SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()`,
    ),
  );
  assert.ok(open.rows[0].n <= 10, `at most GW_DB_POOL_MAX connections: ${open.rows[0].n}`);

  const back = gw.logs.length;
  await readOnly(false);
  await postgresLine('dependency recovered', back);
  // Made again, a few at a time as devices would retry (the hash pool admits a few at once).
  const again: { code?: string }[] = [];
  for (let i = 0; i < requests.length; i += 4) {
    again.push(
      ...(await within(
        'registrations made again',
        Promise.all(requests.slice(i, i + 4).map((r) => outcome(register(r)))),
      )),
    );
  }
  assert.deepEqual(
    again.slice(1, names.length).map((o) => o.code),
    names.slice(1).map(() => 'ok'),
    'every other name made',
  );
  assert.deepEqual(
    [again[0].code, again[names.length].code].sort(),
    ['ok', 'username_taken'],
    'the name asked twice made once',
  );
  const accounts = await within(
    'the names looked up',
    admin.query(`SELECT count(*)::int AS n FROM ${gw.schema}.users WHERE username = ANY($1)`, [names]),
  );
  assert.equal(accounts.rows[0].n, names.length, 'one account per name');
  await within('a login', login(0));
  assertNoErrorLines(gw, since);
});
