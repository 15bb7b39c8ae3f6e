/**
 * Splitting a command line into words, as a POSIX shell would (quotes and backslashes; no
 * variables, globs or operators): `register alice a@x.io 'correct horse'` gives the password
 * `correct horse`. The shell-words library is `shlex` (a port of Python's shlex).
 */
import { split } from 'shlex';
import { CommandError } from './command-error.ts';

/** The command word of a line (its first whitespace-separated word) and the raw rest. */
export function headOf(line: string): { head: string; rest: string } {
  const m = /^(\S+)\s*([\s\S]*)$/.exec(line.trim());
  return m ? { head: m[1], rest: m[2] } : { head: '', rest: '' };
}

/** Every word of `text`, quotes removed. Throws a CommandError on an unterminated quote. */
export function words(text: string): string[] {
  try {
    return split(text);
  } catch {
    throw new CommandError('Unterminated quote: close it, or escape it with a backslash.');
  }
}

/**
 * The first `n` words of `text` (split as by `words`), then the rest of the line as typed:
 * `/msg bob it's fine` is `bob` and `it's fine`, apostrophe and spacing kept.
 */
export function wordsThenRest(text: string, n: number): { args: string[]; rest: string } {
  const args: string[] = [];
  let rest = text.trimStart();
  for (let i = 0; i < n && rest; i++) {
    const m = /^(?:'[^']*'|"(?:[^"\\]|\\.)*"|\\.|[^\s'"\\])+/.exec(rest);
    if (!m) throw new CommandError('Unterminated quote: close it, or escape it with a backslash.');
    args.push(...words(m[0]));
    rest = rest.slice(m[0].length).trimStart();
  }
  return { args, rest };
}
