#!/usr/bin/env node
/**
 * The `device-gateway` command: `start` runs the gateway, `migrate` the migrations, `client`
 * the interactive client, `config` prints the settings. Each subcommand is its own module,
 * loaded on demand, with the rest of the arguments.
 */
// Literal import() paths: the build rewrites them to the compiled files.
const COMMANDS: Record<string, { load: () => Promise<unknown>; about: string }> = {
  start: { load: () => import('./main.ts'), about: 'run the gateway (configured by environment variables)' },
  migrate: {
    load: () => import('./auth/migrate-cli.ts'),
    about: 'up [n] | down [n] | goto V | force V | status | create NAME: PostgreSQL migrations',
  },
  client: {
    load: () => import('../client/cli.ts'),
    about: 'the interactive client: client tcp://host:port [--pin …]',
  },
  config: {
    load: () => import('./config-doc.ts'),
    about: 'print the configuration table (every variable, its default)',
  },
};

const [command, ...rest] = process.argv.slice(2);
const entry = command ? COMMANDS[command] : undefined;
if (!entry) {
  const lines = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(8)} ${c.about}`);
  const out = `usage: device-gateway <command> [args]\n\ncommands:\n${lines.join('\n')}\n`;
  if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(out);
  } else {
    process.stderr.write(`unknown command ${JSON.stringify(command)}\n\n${out}`);
    process.exitCode = 2;
  }
} else {
  // The subcommand reads its own arguments from process.argv, as when run directly.
  process.argv = [process.argv[0], process.argv[1], ...rest];
  await entry.load();
}
