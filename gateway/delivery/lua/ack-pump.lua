--[[
  Applies acks and takes the next events to send, for every session with news in one
  event-loop tick of one node (the delivery service batches them into one call).

  KEYS, 7 per session, session j (from 0) at 7j+1..7j+7: q, ev, att, rc, exp, seq as in
  publish.lua, then
    sent  STRING the highest sequence ever sent to a connection of the session

  ARGV[1] now (ms)
  then per session, in KEYS order:
    sequence after which to take events (the last one already sent on this connection)
    how many to take (free slots of the in-flight window)
    number of acked eids that follow
    the acked eids

  Returns one {acked, receipts, send, expired, resynced} per session
    acked    number of acks that removed an event (the rest were stray or duplicate)
    receipts {eid, payload, ...} of acked events that asked for a receipt
    send     {eid, seq, attempt, payload, ...} in sequence order
    expired  {eid, payload, ...} found past their expiry (removed, not sent)
    resynced 1 if Redis lost writes this connection saw (see below): events were taken from
             the start of the outbox, not after the given sequence

  Rollback detection: every call that sends raises `sent` to the last sequence it sent, in the
  same atomic step. A connection that was sent sequence n therefore finds `sent` >= n unless
  Redis lost that write (a restart from an older AOF, a failover to a lagging replica); then
  the sequence counter may have gone back too, and events published since carry sequences the
  connection believes it has passed. Such a session is pumped from the start: only unacked
  events are in the outbox, so this re-sends at most the in-flight window.
]]
local now = tonumber(ARGV[1])
local a = 2
local results = {}
for j = 0, #KEYS / 7 - 1 do
  local k = 7 * j
  local after, want, nacks = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local mark = tonumber(redis.call('GET', KEYS[k + 7]) or '0')
  local resynced = 0
  if tonumber(after) > mark then
    after = '0'
    resynced = 1
  end
  local acked, receipts = 0, {}
  for i = a + 3, a + 2 + nacks do
    local eid = ARGV[i]
    if redis.call('ZREM', KEYS[k + 1], eid) == 1 then
      acked = acked + 1
      if redis.call('SREM', KEYS[k + 4], eid) == 1 then
        receipts[#receipts + 1] = eid
        receipts[#receipts + 1] = redis.call('HGET', KEYS[k + 2], eid)
      end
      redis.call('HDEL', KEYS[k + 2], eid)
      redis.call('HDEL', KEYS[k + 3], eid)
      redis.call('HDEL', KEYS[k + 5], eid)
    end
  end
  a = a + 3 + nacks
  local send, expired = {}, {}
  while want > 0 do
    local asked = want
    local batch = redis.call('ZRANGEBYSCORE', KEYS[k + 1], '(' .. after, '+inf', 'WITHSCORES', 'LIMIT', 0, asked)
    for b = 1, #batch, 2 do
      local eid, seq = batch[b], batch[b + 1]
      after = seq
      local payload = redis.call('HGET', KEYS[k + 2], eid)
      local expiry = redis.call('HGET', KEYS[k + 5], eid)
      if expiry and tonumber(expiry) <= now then
        expired[#expired + 1] = eid
        expired[#expired + 1] = payload
        removeEvent(k, eid)
      else
        send[#send + 1] = eid
        send[#send + 1] = seq
        send[#send + 1] = redis.call('HINCRBY', KEYS[k + 3], eid, 1)
        send[#send + 1] = payload
        want = want - 1
      end
    end
    -- Fewer than asked: the outbox has nothing more (only expired events make another round).
    if #batch < 2 * asked then break end
  end
  -- The attempt counters and the mark expire with the outbox they belong to.
  if #send > 0 then
    local ttl = redis.call('TTL', KEYS[k + 1])
    if ttl > 0 then redis.call('EXPIRE', KEYS[k + 3], ttl) end
    local last = tonumber(send[#send - 2])
    if last > mark then
      if ttl > 0 then
        redis.call('SET', KEYS[k + 7], last, 'EX', ttl)
      else
        redis.call('SET', KEYS[k + 7], last)
      end
    end
  end
  results[#results + 1] = {acked, receipts, send, expired, resynced}
end
return results
