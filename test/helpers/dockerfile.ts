/**
 * The repository's Dockerfile as data, for the deployment tests: its stages in order, each with
 * its instructions (keyword, flags, arguments) and the values a test needs (ENV, exec-form
 * JSON). Parsed by dockerfile-ast, the parser of the Docker language server.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import dockerignore from '@balena/dockerignore';
import { DockerfileParser, type Instruction, type Property } from 'dockerfile-ast';

export const ROOT = new URL('../../', import.meta.url).pathname;

export interface Step {
  keyword: string;
  /** `--from=builder` → { from: 'builder' }. */
  flags: Record<string, string>;
  /** Arguments as words (shell quoting left as written). */
  args: string[];
  /** The arguments as one line (continuations joined): a RUN's command. */
  text: string;
  /** ENV's and ARG's name=value pairs. */
  properties: [string, string][];
  line: number;
}

export interface Stage {
  name: string;
  image: string;
  steps: Step[];
}

function step(i: Instruction): Step {
  const flags: Record<string, string> = {};
  const withFlags = i as Instruction & {
    getFlags?: () => { getName(): string; getValue(): string | null }[];
  };
  for (const f of withFlags.getFlags?.() ?? []) flags[f.getName()] = f.getValue() ?? '';
  const withProps = i as Instruction & { getProperties?: () => Property[] };
  const properties = (withProps.getProperties?.() ?? []).map(
    (p) => [p.getName(), p.getValue() ?? ''] as [string, string],
  );
  return {
    keyword: i.getKeyword(),
    flags,
    args: i.getArguments().map((a) => a.getValue()),
    text: i.getArgumentsContent() ?? '',
    properties,
    line: i.getRange().start.line + 1,
  };
}

/** Stages of the Dockerfile, with `${ARG}` in FROM resolved to the ARG's default. */
export function readDockerfile(path = join(ROOT, 'Dockerfile')): { text: string; stages: Stage[] } {
  const text = readFileSync(path, 'utf8');
  const df = DockerfileParser.parse(text);
  const args = new Map<string, string>();
  const stages: Stage[] = [];
  for (const i of df.getInstructions()) {
    const s = step(i);
    if (s.keyword === 'ARG' && stages.length === 0) {
      for (const [k, v] of s.properties) args.set(k, v);
    } else if (s.keyword === 'FROM') {
      const image = s.args[0].replace(/\$\{(\w+)\}|\$(\w+)/g, (_, a, b) => args.get(a ?? b) ?? '');
      const as = s.args.findIndex((a) => a.toUpperCase() === 'AS');
      stages.push({ name: as >= 0 ? s.args[as + 1] : String(stages.length), image, steps: [] });
    } else if (stages.length > 0) {
      stages[stages.length - 1].steps.push(s);
    }
  }
  return { text, stages };
}

/** The last instruction of `keyword` in a stage (Docker keeps the last CMD, USER...). */
export function last(stage: Stage, keyword: string): Step | undefined {
  return stage.steps.filter((s) => s.keyword === keyword).at(-1);
}

/** ENV of a stage, in order. */
export function stageEnv(stage: Stage): Record<string, string> {
  const env: Record<string, string> = {};
  for (const s of stage.steps) if (s.keyword === 'ENV') for (const [k, v] of s.properties) env[k] = v;
  return env;
}

/** An exec-form (JSON array) instruction's argv; `HEALTHCHECK CMD [...]` gives the CMD's. */
export function execForm(s: Step): string[] {
  const json = s.keyword === 'HEALTHCHECK' ? s.text.replace(/^\s*CMD\s+/, '') : s.text;
  const argv = JSON.parse(json) as unknown;
  if (!Array.isArray(argv) || !argv.every((a) => typeof a === 'string')) {
    throw new Error(`${s.keyword} at line ${s.line} is not in exec form (a JSON array of strings)`);
  }
  return argv;
}

/**
 * The repository's .dockerignore as Docker applies it (@balena/dockerignore ports Docker's own
 * matcher). The package is CommonJS with a `default` on its export, which is how TypeScript
 * sees it from here.
 */
export function contextFilter() {
  return dockerignore.default().add(readFileSync(join(ROOT, '.dockerignore'), 'utf8'));
}
