--[[
  Adds qos-1 events to session outboxes and tells the nodes holding the sessions. One call
  carries every publish of one event-loop tick (outbox.ts batches them); each event is applied
  in order, exactly as if it had its own call, and the whole call is atomic.

  KEYS, 8 per event, event i (from 0) at 8i+1..8i+8:
    q     ZSET eid -> sequence (publish order)
    ev    HASH eid -> packed event
    att   HASH eid -> attempts so far
    rc    SET  eids whose acks are reported to the back end
    exp   HASH eid -> expiry (ms)
    seq   STRING sequence counter
    node  STRING node holding the session (absent when offline)
    sess  HASH the live session (identity); absent: the session is gone

  ARGV[1] outbox bound
  ARGV[2] policy at the bound: "reject" or "drop-oldest"
  ARGV[3] key TTL (s)
  ARGV[4] node channel prefix
  then 5 per event, event i at 5i+5..5i+9: eid, packed event, session id, receipt ("1"/"0"),
  expiry ms or "0"

  Returns 4 per event: status, node|false, droppedEid|false, droppedPayload|false
    status 1 = added, 0 = duplicate eid (no-op), -1 = rejected at the bound, -2 = no such session
  A session gets one wake-up message per call, however many events it got.
]]
local bound, policy, ttl, channel = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4]
-- What this call already did per session: refreshed which TTLs, sent the wake-up.
local out, done = {}, {}
for i = 0, #KEYS / 8 - 1 do
  local k, a = 8 * i, 5 + 5 * i
  local eid, payload, sid, receipt, expiry = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local status, node, droppedEid, droppedPayload = 1, false, false, false
  if redis.call('EXISTS', KEYS[k + 8]) == 0 then
    status = -2
  elseif redis.call('HEXISTS', KEYS[k + 2], eid) == 1 then
    status = 0
  else
    local full = redis.call('ZCARD', KEYS[k + 1]) >= bound
    if full and policy == 'reject' then
      status = -1
    end
    if full and status == 1 then
      droppedEid = redis.call('ZRANGE', KEYS[k + 1], 0, 0)[1]
      droppedPayload = redis.call('HGET', KEYS[k + 2], droppedEid)
      removeEvent(k, droppedEid)
    end
  end
  if status == 1 then
    local seq = redis.call('INCR', KEYS[k + 6])
    redis.call('ZADD', KEYS[k + 1], seq, eid)
    redis.call('HSET', KEYS[k + 2], eid, payload)
    if receipt == '1' then redis.call('SADD', KEYS[k + 4], eid) end
    if expiry ~= '0' then redis.call('HSET', KEYS[k + 5], eid, expiry) end
    -- The outbox lives as long as a session could: its TTL is refreshed by every call that
    -- publishes to it (once per key and call, as the call is atomic).
    local d = done[sid]
    if not d then
      d = {}
      done[sid] = d
      redis.call('EXPIRE', KEYS[k + 1], ttl)
      redis.call('EXPIRE', KEYS[k + 2], ttl)
      redis.call('EXPIRE', KEYS[k + 6], ttl)
    end
    if receipt == '1' and not d.rc then
      d.rc = true
      redis.call('EXPIRE', KEYS[k + 4], ttl)
    end
    if expiry ~= '0' and not d.exp then
      d.exp = true
      redis.call('EXPIRE', KEYS[k + 5], ttl)
    end
    node = redis.call('GET', KEYS[k + 7])
    if node and not d.woken then
      d.woken = true
      redis.call('PUBLISH', channel .. node, 'n' .. sid)
    end
  end
  out[#out + 1] = status
  out[#out + 1] = node or false
  out[#out + 1] = droppedEid
  out[#out + 1] = droppedPayload
end
return out
