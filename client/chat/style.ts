/**
 * Colours of the interactive client (picocolors): on only when the output is a terminal, and
 * never with `NO_COLOR` set to anything but the empty string (no-color.org) or `TERM=dumb`.
 * `FORCE_COLOR` (not empty, not `0`) turns them on for a pipe.
 */
import picocolors from 'picocolors';

export type Style = ReturnType<typeof picocolors.createColors>;

export function colorWanted(stream: { isTTY?: boolean }, env: NodeJS.ProcessEnv = process.env): boolean {
  if (env.NO_COLOR !== undefined && env.NO_COLOR !== '') return false;
  if (env.FORCE_COLOR !== undefined && env.FORCE_COLOR !== '' && env.FORCE_COLOR !== '0') return true;
  return stream.isTTY === true && env.TERM !== 'dumb';
}

export function styleFor(enabled: boolean): Style {
  return picocolors.createColors(enabled);
}
