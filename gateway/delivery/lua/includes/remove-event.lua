-- Included before the outbox scripts that remove events (outbox.ts): removes one event from all
-- the keys of its session's outbox. `K` holds those keys from K[1]: q, ev, att, rc, exp (KEYS
-- itself for a script whose first keys are the session's; a table of names otherwise).
local function removeEvent(K, eid)
  redis.call('ZREM', K[1], eid)
  redis.call('HDEL', K[2], eid)
  redis.call('HDEL', K[3], eid)
  redis.call('SREM', K[4], eid)
  redis.call('HDEL', K[5], eid)
end
