-- Included before the outbox scripts that take their keys as KEYS (resend, take, move; see
-- outbox.ts): removes one event from all the keys of its session's outbox. `k` is where that
-- session's keys start in KEYS (0 for the first session):
-- KEYS[k+1] q, KEYS[k+2] ev, KEYS[k+3] att, KEYS[k+4] rc, KEYS[k+5] exp.
local function removeEvent(k, eid)
  redis.call('ZREM', KEYS[k + 1], eid)
  redis.call('HDEL', KEYS[k + 2], eid)
  redis.call('HDEL', KEYS[k + 3], eid)
  redis.call('SREM', KEYS[k + 4], eid)
  redis.call('HDEL', KEYS[k + 5], eid)
end
