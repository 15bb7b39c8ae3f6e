/** HTTP API calls shared by the tests of the auth routes. */
import assert from 'node:assert/strict';
import { newName, PASSWORD } from './accounts.ts';
import { fetchWithin } from './deadline.ts';

/** POSTs `body` as JSON (a string is sent as it is, to test malformed bodies). */
export function postJson(
  url: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<Response> {
  return fetchWithin(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

/** Registers a new user through `POST {base}/auth/register` (201 expected); its username. */
export async function registerOverHttp(
  base: string,
  fields: Record<string, unknown> = {},
  headers: Record<string, string> = {},
): Promise<string> {
  const username = newName();
  const r = await postJson(
    `${base}/auth/register`,
    { username, email: `${username}@example.com`, password: PASSWORD, ...fields },
    headers,
  );
  assert.equal(r.status, 201, await r.clone().text());
  return username;
}

/** A back end's `POST /v1/events` of one event to `target` (the response, unread). */
export function postEvent(
  httpPort: number,
  apiKey: string,
  target: object,
  eid: string,
  name = 'test.event',
): Promise<Response> {
  return postEvents(httpPort, apiKey, [{ target, eid, name, data: {} }]);
}

/** A back end's `POST /v1/events` of a batch (the response, unread). */
export function postEvents(httpPort: number, apiKey: string, events: object[]): Promise<Response> {
  return fetchWithin(`http://127.0.0.1:${httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${apiKey}` },
    body: JSON.stringify({ events }),
  });
}
