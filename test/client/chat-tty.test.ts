/**
 * The interactive client in a real terminal (tmux: send-keys to type, capture-pane to read the
 * screen), two users against a real gateway process: the chat seed's feel (current room,
 * notices, /users, /rooms, /help, case-insensitive commands), a message arriving while the
 * other user is typing leaves the typed line intact, and colours on a TTY unless NO_COLOR.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connected, newName, PASSWORD } from '../helpers/accounts.ts';
import { until } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { TMUX, Tmux } from '../helpers/tmux.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
const CLI = [process.execPath, '--import', 'tsx', 'client/cli.ts'];
/** Any SGR colour or attribute escape (what colours leave in `capture-pane -e`). */
const SGR_COLOUR = new RegExp(`${String.fromCharCode(27)}\\[[0-9;]*[1-9][0-9;]*m`);
const START_MS = 60_000;

let gw: GatewayProcess | undefined;
let tmux: Tmux | undefined;

before(async () => {
  if (!TMUX) return;
  gw = await startGateway();
  tmux = new Tmux();
});
after(async () => {
  await tmux?.stop();
  await gw?.stop();
});

/** The last non-empty line on the visible screen (the prompt and what is typed on it). */
async function promptLine(t: Tmux, pane: string): Promise<string> {
  const lines = (await t.screen(pane, { visibleOnly: true })).split('\n').filter((l) => l.trim() !== '');
  return lines[lines.length - 1] ?? '';
}

/** Waits until the line being edited (the prompt and what is typed) is `expected`. */
async function waitForPrompt(t: Tmux, pane: string, expected: string, what: string): Promise<void> {
  let last = '';
  await until(`${what}: the ${pane} terminal's prompt line to be ${JSON.stringify(expected)}`, async () => {
    last = await promptLine(t, pane);
    return last.trimEnd() === expected.trimEnd();
  }).catch((e: Error) => {
    throw new Error(`${e.message}; it is ${JSON.stringify(last)}`);
  });
}

test('two users in a terminal: current room, notices, commands, typing not clobbered, colours', async (t) => {
  if (!TMUX || !gw || !tmux) {
    if (process.env.CI) assert.fail('tmux is not installed (.ci/run installs it)');
    t.skip('tmux is not installed (apt-get install tmux)');
    return;
  }
  const alice = newName();
  const bob = newName();
  const c = await connected(gw.tcpUrl);
  for (const u of [alice, bob]) {
    await c.request('register', { username: u, email: `${u}@example.com`, password: PASSWORD });
  }
  await c.close();

  // alice's terminal has colours; bob's has NO_COLOR.
  await tmux.start('alice', ROOT, [...CLI, gw.tcpUrl, '--pin', gw.fingerprint]);
  await tmux.start('bob', ROOT, [...CLI, gw.tcpUrl], { NO_COLOR: '1' });
  for (const [pane, user] of [
    ['alice', alice],
    ['bob', bob],
  ]) {
    await tmux.waitFor(pane, /server identity [0-9a-f]{64}/, 'the connection', START_MS);
    // The password is quoted, as a shell would take it: one word with its spaces.
    await tmux.type(pane, `LOGIN ${user} '${PASSWORD}'`);
    await tmux.press(pane, 'Enter');
    await tmux.waitFor(pane, /\*\*\* Type \/help for available commands\. \*\*\*/, `${user}'s login`);
    await waitForPrompt(tmux, pane, '#general> ', 'the prompt naming the current room');
  }

  // Plain text right after login goes to the current room, #general.
  await tmux.type('alice', 'hello from alice');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('bob', new RegExp(`^\\[${alice}\\]: hello from alice$`, 'm'), "alice's message");

  // bob is halfway through a line when alice's next message arrives: it is written above the
  // prompt, and the prompt is drawn again with bob's text and cursor as they were.
  await tmux.type('bob', 'half typed by bob');
  await waitForPrompt(tmux, 'bob', '#general> half typed by bob', "bob's typing");
  await tmux.type('alice', 'while bob types');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('bob', new RegExp(`^\\[${alice}\\]: while bob types$`, 'm'), 'the message bob receives');
  assert.equal(
    (await promptLine(tmux, 'bob')).trimEnd(),
    '#general> half typed by bob',
    'the typed line is intact',
  );
  await tmux.type('bob', ' and finished');
  await tmux.press('bob', 'Enter');
  await tmux.waitFor(
    'alice',
    new RegExp(`^\\[${bob}\\]: half typed by bob and finished$`, 'm'),
    "bob's whole line, as typed",
  );

  // Colours on alice's terminal, none on bob's (NO_COLOR).
  assert.match(await tmux.screen('alice', { escapes: true }), SGR_COLOUR, 'colours on a TTY');
  assert.doesNotMatch(await tmux.screen('bob', { escapes: true }), SGR_COLOUR, 'no colours with NO_COLOR');

  // /join makes the room current, with the seed's notices; commands are case-insensitive.
  await tmux.type('alice', '/JOIN #Ops');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('alice', /^\*\*\* You joined #ops \*\*\*$/m, "alice's join notice");
  await waitForPrompt(tmux, 'alice', '#ops> ', 'the prompt of the new current room');
  await tmux.type('bob', '/Join ops');
  await tmux.press('bob', 'Enter');
  await waitForPrompt(tmux, 'bob', '#ops> ', "bob's join");
  await tmux.waitFor(
    'alice',
    new RegExp(`^\\*\\*\\* ${bob} joined the room \\*\\*\\*$`, 'm'),
    'the seed notice',
  );
  await tmux.type('bob', 'in ops now');
  await tmux.press('bob', 'Enter');
  await tmux.waitFor('alice', new RegExp(`^\\[${bob}\\]: in ops now$`, 'm'), 'a message in the current room');

  // /users marks (you); /rooms shows member counts and marks the current room.
  await tmux.type('alice', '/users');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('alice', new RegExp(`^  - ${alice} \\(you\\)$`, 'm'), '/users marking (you)');
  const users = await tmux.screen('alice');
  assert.match(users, /^Online Users \(\d+\):$/m);
  assert.match(users, new RegExp(`^  - ${bob}$`, 'm'));
  await tmux.type('alice', '/ROOMS');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('alice', /^ {2}- #ops \(2 members\) \(current\)$/m, '/rooms marking the current room');
  assert.match(await tmux.screen('alice'), /^ {2}- #general \(\d+ members?\)$/m);

  // A room the session is in but that is not the current one: its messages carry its name.
  await tmux.type('alice', '/join #general');
  await tmux.press('alice', 'Enter');
  await waitForPrompt(tmux, 'alice', '#general> ', 'the prompt back in #general');
  await tmux.type('bob', 'ops while alice is in general');
  await tmux.press('bob', 'Enter');
  await tmux.waitFor(
    'alice',
    new RegExp(`^\\[#ops\\] \\[${bob}\\]: ops while alice is in general$`, 'm'),
    'a message of a room that is not the current one',
  );

  // /leave returns to #general; leaving #general is refused in the seed's words.
  await tmux.type('alice', '/join #ops');
  await tmux.press('alice', 'Enter');
  await waitForPrompt(tmux, 'alice', '#ops> ', 'the prompt in #ops again');
  await tmux.type('alice', '/Leave');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('alice', /^\*\*\* You left #ops and returned to #general \*\*\*$/m, 'the leave notice');
  await waitForPrompt(tmux, 'alice', '#general> ', 'the prompt back in #general');
  await tmux.waitFor(
    'bob',
    new RegExp(`^\\*\\*\\* ${alice} left the room \\*\\*\\*$`, 'm'),
    'the seed notice',
  );
  await tmux.type('alice', '/leave');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('alice', /^ERROR: You are already in the default room\.$/m, 'the refusal');

  // /help lists the commands.
  await tmux.type('alice', '/HELP');
  await tmux.press('alice', 'Enter');
  const help = await tmux.waitFor('alice', /^Available Commands:$/m, 'the help');
  for (const cmd of [
    '/join <room>',
    '/leave',
    '/rooms',
    '/users',
    '/msg <user> <message>',
    '/quit',
    '/login',
  ]) {
    assert.ok(help.includes(`  ${cmd}`), `/help lists ${cmd}`);
  }

  // Ctrl-C clears the typed line; on an empty line it quits, as /quit does.
  await tmux.type('bob', 'never sent');
  await waitForPrompt(tmux, 'bob', '#ops> never sent', "bob's typing");
  await tmux.press('bob', 'C-c');
  await waitForPrompt(tmux, 'bob', '#ops> ', 'the line cleared by Ctrl-C');
  await tmux.press('bob', 'C-c');
  await tmux.waitFor('bob', /\*\*\* Goodbye! \*\*\*/, 'the goodbye after Ctrl-C');
  await tmux.type('alice', '/quit');
  await tmux.press('alice', 'Enter');
  await tmux.waitFor('alice', /\*\*\* Goodbye! \*\*\*/, 'the goodbye');
});
