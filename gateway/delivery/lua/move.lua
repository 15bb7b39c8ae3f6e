--[[
  Moves every event of a session's outbox to another session's: a device taken over by a new
  session of the same account keeps its events (PROTOCOL.md §4). Events keep their eid,
  attempts, receipt and expiry, and go after anything already in the new outbox, in their
  publish order; the node holding the new session is told, as publish.lua does. The old
  outbox is deleted. An event with no attempt entry at or below the old session's sent mark
  (its `sent` key, next to q) was sent once, from its publish (publish.lua): it moves with an
  attempt count of 1, as the new session's mark says nothing of it.

  KEYS[1..6]   q, ev, att, rc, exp, seq of the old session (as in publish.lua)
  KEYS[7..13]  q, ev, att, rc, exp, seq, node of the new session
  KEYS[14]     sess, the new session (identity); absent: nothing moves

  ARGV[1] key TTL (s)
  ARGV[2] node channel prefix
  ARGV[3] new session id
  ARGV[4] outbox bound (GW_OUTBOX_MAX)
  ARGV[5] policy at the bound: "reject" or "drop-oldest"
  ARGV[6], ARGV[7], ARGV[8] the drop receipts' prefix, the owed reports ZSET and now (ms), or
  absent: a dropped event is kept as publish.lua keeps one (ARGV[14..16] there) until its
  `delivery.dropped` is queued

  The new outbox stays within the bound, as a publish would leave it: under "reject" events
  that do not fit stay in the old outbox (the caller purges them, reported failed); under
  "drop-oldest" everything moves and the oldest events of the new outbox are dropped.

  Returns -1 when the new session is gone (the caller purges the old outbox instead), else
  {moved, dropped, left, unreadable, unreadableNew}: moved {eid, expiry|false, ...} of the moved
  events (an eid the new outbox already has is not moved twice: it is delivered there anyway),
  dropped {eid, payload, ...} of events dropped from the new outbox, left the number of events
  left in the old one, unreadable and unreadableNew the eids of events of the old outbox and
  of those the bound dropped from the new one whose payload was gone while their index entry
  stayed (ack-pump.lua's `unreadable`): removed, not moved, not reported.
]]
if redis.call('EXISTS', KEYS[14]) == 0 then return -1 end
local bound, policy = tonumber(ARGV[4]), ARGV[5]
local out, dropped, left, unreadable, unreadableNew = {}, {}, 0, {}, {}
-- The new session's q, ev, att, rc, exp, for removeEvent.
local NEW = { KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11] }
local oldMark = tonumber(redis.call('GET', string.sub(KEYS[1], 1, -2) .. 'sent') or '0')
local old = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for o = 1, #old, 2 do
  local eid, oldSeq = old[o], tonumber(old[o + 1])
  local payload = redis.call('HGET', KEYS[2], eid)
  if not payload then
    unreadable[#unreadable + 1] = eid
    removeEvent(KEYS, eid)
  elseif policy == 'reject' and redis.call('ZCARD', KEYS[7]) >= bound then
    left = left + 1
  else
    -- An eid the new outbox already has is not moved twice: it is delivered there anyway.
    if redis.call('HEXISTS', KEYS[8], eid) == 0 then
      local seq = redis.call('INCR', KEYS[12])
      redis.call('ZADD', KEYS[7], seq, eid)
      redis.call('HSET', KEYS[8], eid, payload)
      local attempts = redis.call('HGET', KEYS[3], eid)
      if not attempts and oldSeq <= oldMark then attempts = '1' end
      if attempts then redis.call('HSET', KEYS[9], eid, attempts) end
      if redis.call('SISMEMBER', KEYS[4], eid) == 1 then redis.call('SADD', KEYS[10], eid) end
      local expiry = redis.call('HGET', KEYS[5], eid)
      if expiry then redis.call('HSET', KEYS[11], eid, expiry) end
      out[#out + 1] = eid
      out[#out + 1] = expiry or false
    end
    removeEvent(KEYS, eid)
  end
end
while redis.call('ZCARD', KEYS[7]) > bound do
  local eid = redis.call('ZRANGE', KEYS[7], 0, 0)[1]
  local payload = redis.call('HGET', KEYS[8], eid)
  if not payload then
    unreadableNew[#unreadableNew + 1] = eid
  else
    dropped[#dropped + 1] = eid
    dropped[#dropped + 1] = payload
    if ARGV[6] then
      local r = ARGV[6] .. ARGV[3] .. ':' .. eid
      redis.call('SET', r, cmsgpack.pack({ARGV[3], payload}))
      redis.call('ZADD', ARGV[7], ARGV[8], r)
    end
  end
  removeEvent(NEW, eid)
end
-- What did not fit stays for the caller to purge; otherwise the old outbox is gone.
if left == 0 then
  for i = 1, 6 do redis.call('DEL', KEYS[i]) end
end
if #out > 0 then
  local ttl = tonumber(ARGV[1])
  for i = 7, 12 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
  local node = redis.call('GET', KEYS[13])
  if node then redis.call('PUBLISH', ARGV[2] .. node, 'n' .. ARGV[3]) end
end
return {out, dropped, left, unreadable, unreadableNew}
