/**
 * A bench's command line, declared once: each option's type, default and a line of help.
 * `benchArgs` reads `process.argv` (node:util parseArgs underneath) and returns the values,
 * typed and checked, or ends the process:
 *
 * - `--help` / `-h`: the usage (script, file, one line per option, where to read more) on
 *   stdout, exit 0;
 * - an option the bench does not take, an option without its value, an argument where none is
 *   taken (or one it needs missing): one line saying so, then the usage, on stderr, exit 2;
 * - a value that is not of its option's (or argument's) type or range: one line naming the
 *   option and the value, exit 2; `refuse` does the same for a bench's own checks (one option
 *   against another).
 *
 * A bench calls it before anything else it does (a build of dist/, a gateway, a connection), so
 * a refused command line starts nothing. With `BENCH_ARGS_ONLY=1` in the environment a command
 * line that passes ends there, exit 0: bench:ab checks the bench:delivery options it passes on.
 */
import { spawnSync } from 'node:child_process';
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

interface Common {
  /** One line: what the option does. */
  help: string;
  /** Its value's name in the usage (default: N, VALUE, or the choices). */
  arg?: string;
  /** Not in the usage: used between a bench's own processes. */
  hidden?: boolean;
}

export type Option =
  | (Common & { type: 'flag' })
  | (Common & {
      type: 'string';
      default?: string;
      /** An environment variable whose value, when set, is the default (the usage names it, not its value). */
      env?: string;
      /** The values taken (each of them, with `list`). */
      choices?: readonly string[];
      /** A value it must match, and what that means in words. */
      pattern?: RegExp;
      means?: string;
      /** Comma-separated values: a string[]. */
      list?: boolean;
      /** Given any number of times: a string[], empty by default. */
      repeat?: boolean;
      required?: boolean;
    })
  | (Common & {
      type: 'int' | 'number';
      default?: number | string;
      /** Inclusive bounds; without `min`, an int is at least 1 and a number above 0. */
      min?: number;
      max?: number;
      /** Comma-separated values: a number[]. */
      list?: boolean;
      required?: boolean;
    });

type Value<O> = O extends { type: 'flag' }
  ? boolean
  : O extends { repeat: true }
    ? string[]
    :
        | (O extends { type: 'int' | 'number' }
            ? O extends { list: true }
              ? number[]
              : number
            : O extends { list: true }
              ? string[]
              : string)
        | (O extends { default: string | number } | { required: true } ? never : undefined);

export type Values<T extends Record<string, Option>> = { -readonly [K in keyof T]: Value<T[K]> };

export interface Command<
  T extends Record<string, Option>,
  A extends Record<string, Option> = Record<never, Option>,
> {
  /** The npm script that runs it, e.g. `bench:delivery` (none: run by another bench). */
  script?: string;
  /** `import.meta.url` of the bench's entry file. */
  url: string;
  /** One line: what it measures. */
  about: string;
  /** Its section of bench/README.md (none: the README's table, and the file's header comment). */
  readme?: string;
  options: T;
  /** The arguments it takes, in order, before any option (none: none); optional ones last. */
  args?: A;
  /** What it takes after `--`, passed on as it is (none: nothing). */
  rest?: string;
}

/** `--env NAME=value`, repeatable: extra gateway settings for the bench's gateways. */
export function envOption(help: string) {
  return {
    type: 'string',
    repeat: true,
    arg: 'NAME=value',
    pattern: /^[A-Za-z_][A-Za-z0-9_]*=/,
    means: 'NAME=value',
    help,
  } as const;
}

/**
 * `rev` when it names a commit of this repository; else the process ends with a usage error
 * naming `option` (before anything starts, rather than at its first `git show`).
 */
export function commitOption(option: string, rev: string): string {
  const r = spawnSync('git', ['rev-parse', '--verify', '--quiet', `${rev}^{commit}`], {
    cwd: ROOT,
    stdio: 'ignore',
  });
  if (r.status !== 0) refuse(`${option} ${rev}: not a commit of this repository`);
  return rev;
}

/** Ends the process with a usage error: `message` on one line, then `usage` when given. */
export function refuse(message: string, usage?: string): never {
  process.stderr.write(`${message}\n${usage ? `${usage}\n` : ''}`);
  process.exit(2);
}

function placeholder(o: Option): string {
  if (o.arg) return o.arg;
  if (o.type === 'flag') return '';
  if (o.type === 'string') return o.choices ? o.choices.join(o.list ? ',' : '|') : 'VALUE';
  return o.list ? 'N,...' : 'N';
}

/** What a value must be, in words ('' when anything goes); `short`: for the usage, beside the value's name. */
function expected(o: Option, short = false): string {
  const each = 'list' in o && o.list;
  const listed = each ? ', comma-separated' : '';
  if (o.type === 'flag') return '';
  if (o.type === 'string') {
    if (o.choices)
      return short ? listed.slice(2) : `${each ? 'any' : 'one'} of ${o.choices.join(', ')}${listed}`;
    return o.means ?? '';
  }
  const what = o.type === 'int' ? (each ? 'integers' : 'an integer') : each ? 'numbers' : 'a number';
  const low = o.min === undefined ? (o.type === 'int' ? '≥ 1' : '> 0') : `≥ ${o.min}`;
  const range =
    o.max === undefined
      ? low
      : o.min === undefined && o.type === 'number'
        ? `${low}, ≤ ${o.max}`
        : `from ${o.min ?? 1} to ${o.max}`;
  return `${short ? what.replace(/^an? /, '') : what} ${range}${listed}`;
}

/** A positional argument's name in the usage, in brackets when it may be left out. */
function argName(name: string, o: Option): string {
  const n = o.arg ?? name.toUpperCase();
  return 'required' in o && o.required ? n : `[${n}]`;
}

/** The default in the usage: the environment variable's name (never its value), then the default. */
function defaultNote(o: Option): string {
  const env = 'env' in o && o.env ? `$${o.env}` : '';
  const value = 'default' in o && o.default !== undefined && o.default !== '' ? String(o.default) : '';
  if (env && value) return `default ${env}, else ${value}`;
  return env || value ? `default ${env || value}` : '';
}

function usage(cmd: Command<Record<string, Option>, Record<string, Option>>, file: string): string {
  const rest = cmd.rest ? ` [-- ${cmd.rest}]` : '';
  const args = Object.entries(cmd.args ?? {});
  const positional = args.map(([name, o]) => ` ${argName(name, o)}`).join('');
  const visible = Object.entries(cmd.options).filter(([, o]) => !o.hidden);
  const opts = visible.length > 0 ? ' [options]' : '';
  const run = cmd.script
    ? `npm run ${cmd.script}${positional || opts || rest ? ` --${positional}${opts}${rest}` : ''}   (${file})`
    : `tsx ${file}${positional}${opts}${rest}`;
  const row = (left: string, o: Option, required: boolean) => {
    const notes = [
      expected(o, true),
      required ? 'required' : '',
      'repeat' in o && o.repeat ? 'repeatable' : '',
      defaultNote(o),
    ].filter(Boolean);
    return [left, `${o.help}${notes.length > 0 ? ` (${notes.join('; ')})` : ''}`];
  };
  const rows = [
    ...args.map(([name, o]) => row(argName(name, o), o, false)),
    ...visible.map(([name, o]) =>
      row(
        `--${name}${placeholder(o) ? ` ${placeholder(o)}` : ''}`,
        o,
        'required' in o && o.required === true,
      ),
    ),
  ];
  rows.push(['-h, --help', 'this help']);
  const width = Math.max(...rows.map(([l]) => l.length)) + 2;
  return [
    run,
    cmd.about,
    '',
    ...(visible.length > 0 || args.length > 0 ? [] : ['It takes no options.']),
    ...rows.map(([l, r]) => `  ${l.padEnd(width)}${r}`),
    '',
    cmd.readme
      ? `More: bench/README.md, "${cmd.readme}".`
      : `More: bench/README.md (its table) and the comment at the top of ${file}.`,
  ].join('\n');
}

/** Edit distance, for "did you mean". */
function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++)
      row[j] = Math.min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = row;
  }
  return prev[b.length];
}

/** One value of `label` (an option's --name, an argument's NAME), checked; `raw` is what was given for it (for the message). */
function convert(label: string, o: Option, item: string, raw: string): string | number {
  const bad = (): never =>
    refuse(`${label}: ${expected(o)}, not '${item}'${item !== raw ? ` (in '${raw}')` : ''}`);
  if (o.type === 'string') {
    if (o.choices && !o.choices.includes(item)) bad();
    if (o.pattern && !o.pattern.test(item)) bad();
    return item;
  }
  if (o.type === 'flag') return item;
  const n = item.trim() === '' ? Number.NaN : Number(item);
  const min = o.min ?? (o.type === 'int' ? 1 : Number.MIN_VALUE);
  if (!Number.isFinite(n) || (o.type === 'int' && !Number.isInteger(n)) || n < min || n > (o.max ?? n)) bad();
  return n;
}

/** Parses and checks this process's arguments against `cmd.options`; see the top of the file. */
export function benchArgs<
  const T extends Record<string, Option>,
  const A extends Record<string, Option> = Record<never, Option>,
>(
  cmd: Command<T, A>,
  argv: string[] = process.argv.slice(2),
): { values: Values<T>; args: Values<A>; rest: string[] } {
  const file = relative(ROOT, fileURLToPath(cmd.url));
  const text = () => usage(cmd, file);
  const specs: Record<string, Option> = cmd.options;
  const { values, tokens } = parseArgs({
    args: argv,
    options: {
      ...Object.fromEntries(
        Object.entries(specs).map(([name, o]) => [
          name,
          { type: o.type === 'flag' ? 'boolean' : 'string', multiple: 'repeat' in o && o.repeat === true },
        ]),
      ),
      help: { type: 'boolean', short: 'h' },
    } as Record<string, { type: 'string' | 'boolean'; multiple?: boolean; short?: string }>,
    strict: false,
    allowPositionals: true,
    tokens: true,
  });
  if (tokens.some((t) => t.kind === 'option' && t.name === 'help')) {
    process.stdout.write(`${text()}\n`);
    process.exit(0);
  }
  const argSpecs = Object.entries(cmd.args ?? ({} as Record<string, Option>));
  const given: string[] = [];
  const rest: string[] = [];
  let afterTerminator = false;
  for (const t of tokens) {
    if (t.kind === 'option-terminator') {
      if (!cmd.rest) refuse(`unexpected '--': ${cmd.script ?? file} takes nothing after it`, text());
      afterTerminator = true;
    } else if (t.kind === 'positional') {
      if (afterTerminator) rest.push(t.value);
      else if (given.length < argSpecs.length) given.push(t.value);
      else refuse(`unexpected argument '${t.value}'${cmd.rest ? `: ${cmd.rest} go after --` : ''}`, text());
    } else {
      const o = specs[t.name];
      if (!o) {
        const near = Object.keys(specs)
          .filter((n) => !specs[n].hidden && distance(n, t.name) <= 2)
          .sort((a, b) => distance(a, t.name) - distance(b, t.name))[0];
        refuse(`unknown option '${t.rawName}'${near ? ` (did you mean --${near}?)` : ''}`, text());
      }
      if (o.type === 'flag' && t.value !== undefined)
        refuse(`${t.rawName} takes no value, not '${t.value}'`, text());
      // A value that looks like an option (and not like a negative number) is one forgotten.
      if (o.type !== 'flag' && (t.value === undefined || (!t.inlineValue && /^-(?![\d.])/.test(t.value))))
        refuse(`${t.rawName} needs a value (${placeholder(o)})`, text());
    }
  }
  const positionals: Record<string, unknown> = {};
  argSpecs.forEach(([name, o], i) => {
    const raw = given[i] ?? ('default' in o && o.default !== undefined ? String(o.default) : undefined);
    if (raw === undefined) {
      if ('required' in o && o.required) refuse(`missing argument ${argName(name, o)}`, text());
      positionals[name] = undefined;
    } else positionals[name] = convert(o.arg ?? name.toUpperCase(), o, raw, raw);
  });
  const out: Record<string, unknown> = {};
  for (const [name, o] of Object.entries(specs)) {
    const given = values[name] as string | string[] | boolean | undefined;
    if (o.type === 'flag') {
      out[name] = given === true;
    } else if ('repeat' in o && o.repeat) {
      out[name] = ((given as string[] | undefined) ?? []).map((v) => convert(`--${name}`, o, v, v));
    } else {
      const env = 'env' in o && o.env ? process.env[o.env] : undefined;
      const raw =
        (given as string | undefined) ?? env ?? (o.default === undefined ? undefined : String(o.default));
      if (raw === undefined) {
        if ('required' in o && o.required) refuse(`--${name} is required`, text());
        out[name] = undefined;
      } else {
        out[name] = o.list
          ? raw.split(',').map((v) => convert(`--${name}`, o, v.trim(), raw))
          : convert(`--${name}`, o, raw, raw);
      }
    }
  }
  if (process.env.BENCH_ARGS_ONLY === '1') process.exit(0);
  return { values: out as Values<T>, args: positionals as Values<A>, rest };
}
