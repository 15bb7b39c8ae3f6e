/** `npm run migrate -- up|down|status [count]` against DATABASE_URL (schema GW_DB_SCHEMA). */
import { loadConfig } from '../config.ts';
import { migrate, migrationStatus } from './migrate.ts';

const [command, countArg] = process.argv.slice(2);
const config = loadConfig();
const count = countArg === undefined ? undefined : Number(countArg);
if (count !== undefined && (!Number.isInteger(count) || count < 1)) {
  console.error('count must be a positive integer');
  process.exit(2);
}
if (command === 'up' || command === 'down') {
  const names = await migrate({
    url: config.databaseUrl,
    schema: config.dbSchema,
    direction: command,
    count: count ?? (command === 'down' ? 1 : undefined),
    log: (m) => console.log(m),
  });
  console.log(names.length ? `${command}: ${names.join(', ')}` : `${command}: nothing to do`);
} else if (command === 'status') {
  for (const s of await migrationStatus(config.databaseUrl, config.dbSchema)) {
    console.log(
      `${s.appliedAt ? 'applied ' + s.appliedAt.toISOString() : 'pending                         '}  ${s.name}`,
    );
  }
} else {
  console.error('usage: npm run migrate -- up [count] | down [count] | status');
  process.exit(2);
}
