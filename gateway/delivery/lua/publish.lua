--[[
  Adds one qos-1 event to a session's outbox and tells the node holding the session.

  KEYS[1] q     ZSET eid -> sequence (publish order)
  KEYS[2] ev    HASH eid -> packed event
  KEYS[3] att   HASH eid -> attempts so far
  KEYS[4] rc    SET  eids whose acks are reported to the back end
  KEYS[5] exp   HASH eid -> expiry (ms)
  KEYS[6] seq   STRING sequence counter
  KEYS[7] node  STRING node holding the session (absent when offline)
  KEYS[8] sess  HASH the live session (identity); absent: the session is gone

  ARGV[1] eid
  ARGV[2] packed event
  ARGV[3] outbox bound
  ARGV[4] policy at the bound: "reject" or "drop-oldest"
  ARGV[5] key TTL (s)
  ARGV[6] node channel prefix
  ARGV[7] session id
  ARGV[8] receipt: "1" or "0"
  ARGV[9] expiry ms, or "0"

  Returns {status, node|false, droppedEid|false, droppedPayload|false}
    status 1 = added, 0 = duplicate eid (no-op), -1 = rejected at the bound, -2 = no such session
]]
if redis.call('EXISTS', KEYS[8]) == 0 then
  return {-2, false, false, false}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {0, false, false, false}
end
local droppedEid, droppedPayload = false, false
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  if ARGV[4] == 'reject' then
    return {-1, false, false, false}
  end
  droppedEid = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  droppedPayload = redis.call('HGET', KEYS[2], droppedEid)
  removeEvent(droppedEid)
end
local seq = redis.call('INCR', KEYS[6])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[8] == '1' then redis.call('SADD', KEYS[4], ARGV[1]) end
if ARGV[9] ~= '0' then redis.call('HSET', KEYS[5], ARGV[1], ARGV[9]) end
-- The outbox lives as long as a session could: its TTL is refreshed on every publish.
local ttl = tonumber(ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[6], ttl)
if ARGV[8] == '1' then redis.call('EXPIRE', KEYS[4], ttl) end
if ARGV[9] ~= '0' then redis.call('EXPIRE', KEYS[5], ttl) end
local node = redis.call('GET', KEYS[7])
if node then
  redis.call('PUBLISH', ARGV[6] .. node, 'n' .. ARGV[7])
end
return {1, node or false, droppedEid, droppedPayload}
