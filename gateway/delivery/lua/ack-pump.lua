--[[
  One round trip per session per tick: apply acks, then take the next events to send.

  KEYS[1..6] as in publish.lua (q, ev, att, rc, exp, seq)

  ARGV[1] sequence after which to take events (the last one already sent on this connection)
  ARGV[2] how many to take (free slots of the in-flight window)
  ARGV[3] now (ms)
  ARGV[4] number of acked eids that follow
  ARGV[5..] acked eids

  Returns {acked, receipts, send, expired}
    acked    number of acks that removed an event (the rest were stray or duplicate)
    receipts {eid, payload, ...} of acked events that asked for a receipt
    send     {eid, seq, attempt, payload, ...} in sequence order
    expired  {eid, payload, ...} found past their expiry (removed, not sent)
]]
local acked = 0
local receipts = {}
local nacks = tonumber(ARGV[4])
for i = 5, 4 + nacks do
  local eid = ARGV[i]
  if redis.call('ZREM', KEYS[1], eid) == 1 then
    acked = acked + 1
    if redis.call('SREM', KEYS[4], eid) == 1 then
      receipts[#receipts + 1] = eid
      receipts[#receipts + 1] = redis.call('HGET', KEYS[2], eid)
    end
    redis.call('HDEL', KEYS[2], eid)
    redis.call('HDEL', KEYS[3], eid)
    redis.call('HDEL', KEYS[5], eid)
  end
end
local send, expired = {}, {}
local want = tonumber(ARGV[2])
if want > 0 then
  local now = tonumber(ARGV[3])
  local after = ARGV[1]
  while want > 0 do
    local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. after, '+inf', 'WITHSCORES', 'LIMIT', 0, want)
    if #batch == 0 then break end
    for j = 1, #batch, 2 do
      local eid, seq = batch[j], batch[j + 1]
      after = seq
      local payload = redis.call('HGET', KEYS[2], eid)
      local expiry = redis.call('HGET', KEYS[5], eid)
      if expiry and tonumber(expiry) <= now then
        expired[#expired + 1] = eid
        expired[#expired + 1] = payload
        removeEvent(eid)
      else
        send[#send + 1] = eid
        send[#send + 1] = seq
        send[#send + 1] = redis.call('HINCRBY', KEYS[3], eid, 1)
        send[#send + 1] = payload
        want = want - 1
      end
    end
  end
end
-- The attempt counters expire with the outbox they belong to.
if #send > 0 then
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
end
return {acked, receipts, send, expired}
