/**
 * `POST /v1/events`: back ends publish events to devices over HTTP, authenticated with the API
 * key (`Authorization: Bearer <GW_API_KEY>`). Body: one `{target, name, data?, qos?, ttl?,
 * receipt?, eid?}` or `{events: [...]}`; reply 202 `{eids}` once every qos-1 event is durable.
 */

import type uWS from 'uWebSockets.js';
import { timingSafeEqual } from 'node:crypto';
import { ProtocolError } from '../../protocol/index.ts';
import { validateEventInput } from '../delivery/publisher.ts';
import type { DeliveryService } from '../delivery/service.ts';
import type { Logger } from '../log.ts';
import { route } from './json.ts';

const MAX_BODY = 1024 * 1024;
const MAX_EVENTS = 1000;

export function checkApiKey(header: string | undefined, apiKey: string): void {
  if (!apiKey) throw new ProtocolError('forbidden', 'the HTTP API is disabled: GW_API_KEY is not set');
  const given = Buffer.from(header?.startsWith('Bearer ') ? header.slice(7) : '');
  const want = Buffer.from(apiKey);
  if (given.length !== want.length || !timingSafeEqual(given, want)) {
    throw new ProtocolError('unauthenticated', 'missing or wrong API key');
  }
}

export function mountEventsApi(
  app: uWS.TemplatedApp,
  delivery: DeliveryService,
  apiKey: string,
  log: Logger,
): void {
  app.post(
    '/v1/events',
    route(log, async (ex) => {
      checkApiKey(ex.header('authorization'), apiKey);
      const body = (await ex.readJson(MAX_BODY)) as Record<string, unknown>;
      const items = Array.isArray(body?.events) ? body.events : [body];
      if (items.length === 0 || items.length > MAX_EVENTS) {
        throw new ProtocolError('bad_message', `events: 1-${MAX_EVENTS} events per request`, {
          field: 'events',
        });
      }
      const checked = items.map((item: Record<string, unknown>) => validateEventInput(item?.target, item));
      const results = [];
      for (const { target, event } of checked) {
        const o = await delivery.publish(target, event);
        results.push({ eid: o.eid, sessions: o.sessions, accepted: o.accepted, rejected: o.rejected });
      }
      ex.json('202 Accepted', { eids: results.map((r) => r.eid), results });
    }),
  );
}
