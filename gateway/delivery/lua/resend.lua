--[[
  Takes one event again for a retry.

  KEYS[1..6] as in publish.lua (q, ev, att, rc, exp, seq)
  ARGV[1] eid
  ARGV[2] now (ms)
  ARGV[3], ARGV[4] a receipt key and the owed reports ZSET (Keys.owedReports), or absent: an
  event removed as expired is kept there (its payload), noted in the ZSET at now, until the
  node reported it (a reply lost to Redis frozen or slow past the node's timeout, or a node
  that died first, leaves it to its retry or to the sweep)
  ARGV[5] (with ARGV[3]) the attempt the node last sent the event as, or absent: this resend is
  the next, whatever the counter says. A resend whose reply was lost may have been run and
  raised the counter already; the one after it then sends the attempt it took, not one more
  (the node never sent it). Absent: one more than the counter.

  Returns false when the event is gone (acked, expired or dead-lettered),
  {"unreadable"} when its payload is gone while its index entry stayed (evicted or deleted
  apart, a write that failed part-way: ack-pump.lua's `unreadable`): removed, it can never be
  sent nor reported,
  {"expired", payload} when it is past its expiry (removed),
  {"send", attempt, payload} otherwise.
]]
local eid = ARGV[1]
if not redis.call('ZSCORE', KEYS[1], eid) then return false end
local payload = redis.call('HGET', KEYS[2], eid)
if not payload then
  removeEvent(KEYS, eid)
  return {'unreadable'}
end
local expiry = redis.call('HGET', KEYS[5], eid)
if expiry and tonumber(expiry) <= tonumber(ARGV[2]) then
  removeEvent(KEYS, eid)
  if ARGV[3] then
    redis.call('SET', ARGV[3], payload)
    redis.call('ZADD', ARGV[4], ARGV[2], ARGV[3])
  end
  return {'expired', payload}
end
-- A retry follows a send: an event with no attempt entry was sent once, from its publish
-- (publish.lua), so this is its second attempt.
local attempt, created
local sent = tonumber(ARGV[5])
if sent then
  local had = redis.call('HGET', KEYS[3], eid)
  local now = tonumber(had or '1')
  if now > sent then return {'send', now, payload} end
  attempt, created = sent + 1, not had
  redis.call('HSET', KEYS[3], eid, attempt)
else
  attempt = redis.call('HINCRBY', KEYS[3], eid, '1')
  if attempt == 1 then
    attempt, created = redis.call('HINCRBY', KEYS[3], eid, '1'), true
  end
end
if created then
  -- The counters may have been created just now: they expire with the outbox.
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', KEYS[3], string.format('%d', ttl)) end
end
return {'send', attempt, payload}
