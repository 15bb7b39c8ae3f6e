/**
 * docs/openapi.yaml for tests: its routes, and a check of a real response against the schema
 * the document gives for that route, method and status (ajv, JSON Schema 2020-12 as OpenAPI
 * 3.1 uses).
 */
import { readFileSync } from 'node:fs';
import { Ajv2020 } from 'ajv/dist/2020.js';
import { parse } from 'yaml';

const ROOT = new URL('../../', import.meta.url).pathname;
const ID = 'https://gateway.invalid/openapi.json';
const METHODS = new Set(['get', 'put', 'post', 'delete', 'patch', 'head', 'options']);

interface Operation {
  responses: Record<string, { $ref?: string; content?: Record<string, { schema: unknown }> }>;
}
export interface OpenApi {
  paths: Record<string, Record<string, Operation>>;
  components: { responses: Record<string, { content: Record<string, { schema: unknown }> }> };
}

export const openapi = parse(readFileSync(`${ROOT}docs/openapi.yaml`, 'utf8')) as OpenApi;

const ajv = new Ajv2020({ strict: false, validateFormats: false, allErrors: true });
ajv.addSchema(openapi as object, ID);

const pointer = (...parts: string[]) =>
  parts.map((p) => p.replace(/~/g, '~0').replace(/\//g, '~1')).join('/');

/** `{method, path}` of every documented operation, paths in the gateway's `:param` form. */
export function documentedRoutes(): { method: string; path: string }[] {
  const out: { method: string; path: string }[] = [];
  for (const [path, ops] of Object.entries(openapi.paths)) {
    for (const method of Object.keys(ops)) {
      if (!METHODS.has(method)) continue; // path-level `parameters`, `summary`…
      out.push({ method: method.toUpperCase(), path: path.replace(/\{(\w+)\}/g, ':$1') });
    }
  }
  return out;
}

/** Throws, listing the schema errors, unless `body` fits the documented response. */
export function assertDocumented(method: string, path: string, status: number, body: unknown): void {
  const op = openapi.paths[path]?.[method.toLowerCase()];
  if (!op) throw new Error(`${method} ${path} is not in docs/openapi.yaml`);
  const response = op.responses[String(status)];
  if (!response) throw new Error(`${method} ${path} does not document status ${status}`);
  let ref: string;
  if (response.$ref) ref = `${ID}${response.$ref}/content/application~1json/schema`;
  else
    ref = `${ID}#/${pointer('paths', path, method.toLowerCase(), 'responses', String(status), 'content', 'application/json', 'schema')}`;
  const validate = ajv.getSchema(ref) ?? ajv.compile({ $ref: ref });
  if (!validate(body)) {
    throw new Error(
      `${method} ${path} ${status}: the response does not fit docs/openapi.yaml: ${ajv.errorsText(validate.errors)}; body ${JSON.stringify(body).slice(0, 500)}`,
    );
  }
}
