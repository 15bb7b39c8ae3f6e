/**
 * A command the CLI refuses before anything is sent (usage, no session, an unterminated
 * quote): printed as `ERROR: <message>` like the chat seed's errors, and counted as a failed
 * command in a piped script.
 */
export class CommandError extends Error {
  override readonly name = 'CommandError';
}
