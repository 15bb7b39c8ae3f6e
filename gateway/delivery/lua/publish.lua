--[[
  Adds qos-1 events to session outboxes and tells the nodes holding the sessions. One call
  carries every publish of one event-loop tick (outbox.ts batches them); each event is applied
  in order, exactly as if it had its own call, and the whole call is atomic.

  KEYS, 9 per event, event i (from 0) at 9i+1..9i+9:
    q     ZSET eid -> sequence (publish order)
    ev    HASH eid -> packed event
    att   HASH eid -> attempts so far
    rc    SET  eids whose acks are reported to the back end
    exp   HASH eid -> expiry (ms)
    seq   STRING sequence counter
    node  STRING node holding the session (absent when offline)
    sess  HASH the live session (identity); absent: the session is gone
    sent  STRING the highest sequence sent to a connection of the session (see ack-pump.lua)

  ARGV[1] outbox bound
  ARGV[2] policy at the bound: "reject" or "drop-oldest"
  ARGV[3] key TTL (s)
  ARGV[4] node channel prefix
  ARGV[5] the calling node's id ("" when the caller holds no connection)
  then 6 per event, event i at 6i+6..6i+11: eid, packed event, session id, receipt ("1"/"0"),
  expiry ms or "0", claim

  The claim (docs/ARCHITECTURE.md, "Sending from the publish"): "-1", or the last sequence
  sent on the calling node's connection of the session, which asks to send the event from the
  publish itself. The script grants it when the session's node key names the caller, no event
  of the outbox lies between the claim and this event (everything before it was sent on that
  connection, or is gone), and the sent mark lies between the claim and this event (no rollback). A granted
  event counts as sent, as by ack-pump: its attempt counter becomes 1 and the sent mark its
  sequence; the node gets no wake-up for it. Later events of the same session in the call
  chain on from the last granted one.

  Returns 5 per event: status, node|false, droppedEid|false, droppedPayload|false, sequence|false
    status 2 = added and the claim granted (the caller sends it), 1 = added, 0 = duplicate eid
    (no-op), -1 = rejected at the bound, -2 = no such session
  A session gets at most one wake-up message per call, however many events it got.
]]
local bound, policy, ttl, channel, me = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
-- What this call already did per session: refreshed which TTLs, sent the wake-up, last grant.
local out, done = {}, {}
for i = 0, #KEYS / 9 - 1 do
  local k, a = 9 * i, 6 + 6 * i
  local eid, payload, sid, receipt, expiry = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local claim = ARGV[a + 5]
  local status, node, droppedEid, droppedPayload, seq = 1, false, false, false, false
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
    seq = redis.call('INCR', KEYS[k + 6])
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
    local after = d.granted or claim
    local grant = after ~= '-1' and node == me
    if grant then
      local mark = tonumber(redis.call('GET', KEYS[k + 9]) or '0')
      grant = mark >= tonumber(after) and mark < seq
        and redis.call('ZCOUNT', KEYS[k + 1], '(' .. after, '(' .. seq) == 0
    end
    if grant then
      status = 2
      d.granted = tostring(seq)
      redis.call('HINCRBY', KEYS[k + 3], eid, 1)
      redis.call('SET', KEYS[k + 9], seq, 'EX', ttl)
      if not d.att then
        d.att = true
        redis.call('EXPIRE', KEYS[k + 3], ttl)
      end
    else
      -- A refused claim ends the chain: the pump sends this event, and so everything after it.
      d.granted = '-1'
      if node and not d.woken then
        d.woken = true
        redis.call('PUBLISH', channel .. node, 'n' .. sid)
      end
    end
  end
  out[#out + 1] = status
  out[#out + 1] = node or false
  out[#out + 1] = droppedEid
  out[#out + 1] = droppedPayload
  out[#out + 1] = seq
end
return out
