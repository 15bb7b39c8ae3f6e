/**
 * `POST /v1/events`: back ends publish events to devices over HTTP, authenticated with the API
 * key (`Authorization: Bearer <GW_API_KEY>`). Body: one `{target, name, data?, qos?, ttl?,
 * receipt?, eid?}` or `{events: [...]}`; reply 202 `{eids, results}` once every accepted qos-1
 * event is durable. A batch is validated whole (a bad item fails the request, naming
 * `events[i].field`, before anything is published); then each item succeeds or fails on its
 * own, and a failed item's result carries its `error` instead of being hidden in a 404.
 */

import type uWS from 'uWebSockets.js';
import { timingSafeEqual } from 'node:crypto';
import { isProtocolError, ProtocolError } from '../../protocol/index.ts';
import { newEid } from '../delivery/eid.ts';
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
      const batch = Array.isArray(body?.events);
      const items: Record<string, unknown>[] = batch ? (body.events as Record<string, unknown>[]) : [body];
      if (items.length === 0 || items.length > MAX_EVENTS) {
        throw new ProtocolError('bad_message', `events: 1-${MAX_EVENTS} events per request`, {
          field: 'events',
        });
      }
      const checked = items.map((item, i) => {
        try {
          const c = validateEventInput(item?.target, item);
          // Every item has its eid before anything is published, so failed items name theirs.
          if (c.event.eid === undefined) {
            c.event.eid = newEid();
            c.event.eidIsNew = true;
          }
          return c;
        } catch (e) {
          if (!batch || !isProtocolError(e)) throw e;
          // validateEventInput's messages start with the field they name.
          throw new ProtocolError(e.code, `events[${i}].${e.message}`, {
            field: `events[${i}].${e.field ?? 'target'}`,
          });
        }
      });
      const settled = await delivery.publishMany(checked);
      const results = settled.map((r, i) => {
        const eid = checked[i].event.eid;
        if (r.status === 'fulfilled') {
          const o = r.value;
          return {
            eid,
            sessions: o.sessions,
            accepted: o.accepted,
            rejected: o.rejected,
            // Only when some session's outbox could not take it (a key of another type).
            ...(o.failed.length > 0 ? { failed: o.failed.length } : {}),
          };
        }
        // One event's failure is the request's (404 not_found); a batch reports it per item.
        if (!batch || !isProtocolError(r.reason)) throw r.reason;
        return { eid, error: { code: r.reason.code, message: r.reason.message } };
      });
      ex.json('202 Accepted', { eids: results.map((r) => r.eid), results });
    }),
  );
}
