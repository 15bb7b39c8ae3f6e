-- Included before every outbox script (outbox.ts): removes one event from all the keys of its
-- session's outbox, KEYS[1] q, KEYS[2] ev, KEYS[3] att, KEYS[4] rc, KEYS[5] exp.
local function removeEvent(eid)
  redis.call('ZREM', KEYS[1], eid)
  redis.call('HDEL', KEYS[2], eid)
  redis.call('HDEL', KEYS[3], eid)
  redis.call('SREM', KEYS[4], eid)
  redis.call('HDEL', KEYS[5], eid)
end
