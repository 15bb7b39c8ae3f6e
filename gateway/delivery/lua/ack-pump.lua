--[[
  Applies acks and takes the next events to send, for every session with news in one
  event-loop tick of one node (the delivery service batches them into one call).

  Keys of a session are built here from its id, as publish.lua does (head .. sid .. tail ..
  name): q, ev, att, rc, exp, seq as in publish.lua, and
    sent  STRING the highest sequence ever sent to a connection of the session
  The call touches keys it does not declare: one Redis primary, not Redis Cluster. No KEYS.

  ARGV[1] now (ms)
  ARGV[2], ARGV[3] head and tail of a session's key names (Keys.sessionKeyParts)
  ARGV[4] the sessions: a MessagePack array of strings (script-args.ts; read with
  cmsgpack.unpack), per session:
    session id
    sequence after which to take events (the last one already sent on this connection)
    how many to take (free slots of the in-flight window; 0 when the node knows nothing waits:
    the call only applies the acks)
    number of acked eids that follow
    number of bare acked eids that follow them
    unsent from: "0", or a sequence from which events were never sent on this connection nor
    on one before it, though the sent mark may say so: the lowest of an event forwarded to this
    connection (publish.lua) that it did not send, or the first past both the mark when the
    connection was bound and the last sequence sent on it (a forward the node has not read yet
    raised the mark over it); they count as first attempts
    the acked eids
    the bare acked eids: events the node sent from their publish as a first attempt, which
    asked for no receipt and have no expiry (they are in q and ev only: never in rc or exp,
    and a first attempt from the publish writes no att entry), so their removal looks nowhere
    else

  ARGV[5] the expiries ZSET (`sid|eid` -> expiry ms, publish.lua): an acked or expired event
  with an expiry leaves it too
  ARGV[6], ARGV[7] a receipt key and the owed reports ZSET (Keys.owedReports), or absent: when
  the call has receipts or expired events to report, it keeps them there, as
  `{sid, receipts, expired, ...}` (those sessions only, each list as in the reply) packed with
  cmsgpack, and notes the receipt in the ZSET at `now`: the events are gone, and their reports
  are owed until the node queued them and removed both (a reply lost to Redis frozen or slow
  past the node's timeout, or a node that died before it reported, leaves them to its retry or
  to the sweep).
  ARGV[8] (with ARGV[6]) a take record key: when the call takes events, it keeps there, for 5
  minutes, `{sid, from, to, ...}` packed with cmsgpack: for each session it took events of, the
  sequences after which it took them and the last it took (each attempt counter it raised is in
  that range)
  ARGV[9] (with ARGV[8], optional) the take records of calls whose reply the node did not get,
  by session: a cmsgpack array {sid, record key, sid, record key, ...}. Redis may have run such a
  call and dropped its reply, and raised the attempt counters of events that were never sent. A
  session takes the events in its range of the records it names with the attempt that call
  counted, not one more (the node sends them now as the attempt the lost call made); the range
  is carried into this call's record, in case its own reply is lost too. Ignored after a resync
  (the sequences may be those of other events).

  Returns one string, a MessagePack array packed with cmsgpack (script-reply.ts), of one
  {acked, receipts, send, expired, resynced, mark, error?, unreadable?} per session
    acked    number of acks that removed an event (the rest were stray or duplicate)
    receipts {eid, payload, ...} of acked events that asked for a receipt
    send     {eid, seq, attempt, payload, ...} in sequence order
    expired  {eid, payload, ...} found past their expiry (removed, not sent)
    resynced 1 if Redis lost writes this connection saw (see below): events were taken from
             the start of the outbox, not after the given sequence
    mark     the sent mark as the call found it (0 when it took nothing): an event sent as a
             first attempt at or below it, from `unsent from` on, was forwarded to the node,
             which has not read the forward yet (the node then knows the forward for its own)
    error    when a command of the session's part failed (a WRONGTYPE: a key of the session
             Redis cannot use as this script does): the error's message (false when there is
             none but unreadable follows; absent when neither is). The session's part
             stopped there; the others went on. What it removed before is in `acked`,
             `receipts` and `expired` (gone from the outbox, to be reported as any); what it took
             is in `send` and in the take record (its counters raised) but is not to be sent:
             the node tries the session again as after a failed call, naming the record.
    unreadable  only when some: eids of events found in the index without their payload (see
             `unreadable`), acked or taken: removed from the outbox, not sent, not reported.

  Rollback detection: every call that sends raises `sent` to the last sequence it sent, in the
  same atomic step. A connection that was sent sequence n therefore finds `sent` >= n unless
  Redis lost that write (a restart from an older AOF, a failover to a lagging replica); then
  the sequence counter may have gone back too, and events published since carry sequences the
  connection believes it has passed. Such a session is pumped from the start: only unacked
  events are in the outbox, so this re-sends at most the in-flight window.
]]
local now = tonumber(ARGV[1])
local head, tail = ARGV[2], ARGV[3]
local expiries = ARGV[5]
local receipt, owed = ARGV[6], ARGV[7]
local takeRecord = ARGV[8]
local A = cmsgpack.unpack(ARGV[4])
-- The ranges of the lost calls (ARGV[9]) by session: {from, to}, the widest of those it names.
local lostTakes
if ARGV[9] then
  local named, records = cmsgpack.unpack(ARGV[9]), {}
  for i = 1, #named, 2 do
    local sid, key = named[i], named[i + 1]
    local r = records[key]
    if r == nil then
      local rec = redis.call('GET', key)
      r = rec and cmsgpack.unpack(rec) or false
      records[key] = r
    end
    if r then
      for j = 1, #r, 3 do
        if r[j] == sid then
          local from, to = tonumber(r[j + 1]), tonumber(r[j + 2])
          lostTakes = lostTakes or {}
          local had = lostTakes[sid]
          if had then
            if from < had[1] then had[1] = from end
            if to > had[2] then had[2] = to end
          else
            lostTakes[sid] = { from, to }
          end
        end
      end
    end
  end
end
-- What the take record keeps (see above): nothing made unless the call takes.
local took
-- What the receipt keeps (see above): nothing made unless a session has something to report.
local kept

-- The empty answer lists of a session, shared (never appended to): most sessions in a call only
-- have acks applied, and a table each would be made for nothing.
local EMPTY = {}

-- For the take record, set by the session that takes: the sequence it took after, and its lost
-- calls' range (or false).
local takenFrom, takenLost

-- An event of the session's index whose payload is gone from its hash (evicted or deleted apart
-- from the index, a write that failed part-way): it can never be sent nor reported. Its eid goes
-- in the session's answer, its 8th field (the 7th, error, false if there is none).
local function unreadable(r, eid)
  if r[7] == nil then r[7] = false end
  local u = r[8]
  if not u then
    u = {}
    r[8] = u
  end
  u[#u + 1] = eid
end

-- One session's part of the call: applies its acks (A[at] on), takes what it asked for, and
-- fills `r`, its answer {acked, receipts, send, expired, resynced, mark} (an array: the reply
-- packs it as one), as it goes. Run under pcall: a command that fails (a key of the session that
-- Redis cannot use as the script does, left by a bug, an operator or a restore) ends this
-- session's part, not the call.
local function pumpSession(r, sid, after, want, nacks, nbare, unsentFrom, at)
  local base = head .. sid .. tail
  -- Bare acks alone need q and ev only: the other names (each a new Lua string) are made when
  -- something else is to be done.
  local K
  if want > 0 or nacks > 0 then
    K = { base .. 'q', base .. 'ev', base .. 'att', base .. 'rc', base .. 'exp', base .. 'seq', base .. 'sent' }
  else
    K = { base .. 'q', base .. 'ev' }
  end
  -- A call that takes nothing (want 0: acks only) sends nothing, so it neither checks nor
  -- raises the mark; the next call that takes does.
  local mark, resynced = 0, 0
  if want > 0 then
    mark = tonumber(redis.call('GET', K[7]) or '0')
    if tonumber(after) > mark then
      after = '0'
      resynced = 1
    end
  end
  r[5], r[6] = resynced, mark
  -- Sent once at or below `sentOnce`: the mark, less what the forwards here did not send (after
  -- a resync the sequences the connection named may be those of other events: the mark alone).
  local sentOnce = mark
  if unsentFrom > 0 and resynced == 0 and unsentFrom - 1 < sentOnce then sentOnce = unsentFrom - 1 end
  for i = at, at + nacks - 1 do
    local eid = A[i]
    if redis.call('ZREM', K[1], eid) == 1 then
      r[1] = r[1] + 1
      if redis.call('SREM', K[4], eid) == 1 then
        local payload = redis.call('HGET', K[2], eid)
        if payload then
          if r[2] == EMPTY then r[2] = {} end
          local receipts = r[2]
          receipts[#receipts + 1] = eid
          receipts[#receipts + 1] = payload
        else
          unreadable(r, eid)
        end
      end
      redis.call('HDEL', K[2], eid)
      redis.call('HDEL', K[3], eid)
      if redis.call('HDEL', K[5], eid) == 1 and expiries then
        redis.call('ZREM', expiries, sid .. '|' .. eid)
      end
    end
  end
  at = at + nacks
  if nbare == 1 then
    if redis.call('ZREM', K[1], A[at]) == 1 then
      r[1] = r[1] + 1
      redis.call('HDEL', K[2], A[at])
    end
  else
    -- One ZREM and one HDEL for all of them (q and ev hold the same eids, so an eid q did not
    -- have is not in ev either), in slices: a Lua call's stack is bounded.
    for i = at, at + nbare - 1, 256 do
      local last = math.min(i + 255, at + nbare - 1)
      r[1] = r[1] + redis.call('ZREM', K[1], unpack(A, i, last))
      redis.call('HDEL', K[2], unpack(A, i, last))
    end
  end
  if want == 0 then return end
  local send, expired = {}, {}
  r[3], r[4] = send, expired
  -- A lost call's range for this session: its events there already count that call's attempt.
  local lost = resynced == 0 and lostTakes and lostTakes[sid]
  takenFrom, takenLost = tonumber(after), lost
  while want > 0 do
    local asked = want
    local batch = redis.call('ZRANGEBYSCORE', K[1], '(' .. after, '+inf', 'WITHSCORES', 'LIMIT', '0', string.format('%d', asked))
    for b = 1, #batch, 2 do
      local eid, seq = batch[b], batch[b + 1]
      after = seq
      local payload = redis.call('HGET', K[2], eid)
      local expiry = payload and redis.call('HGET', K[5], eid)
      if not payload then
        -- Never to be sent or reported: removed, and named in the answer.
        removeEvent(K, eid)
        if expiries then redis.call('ZREM', expiries, sid .. '|' .. eid) end
        unreadable(r, eid)
      elseif expiry and tonumber(expiry) <= now then
        expired[#expired + 1] = eid
        expired[#expired + 1] = payload
        removeEvent(K, eid)
        if expiries then redis.call('ZREM', expiries, sid .. '|' .. eid) end
      else
        -- No entry yet, at or below the mark: it was sent once, from its publish or forwarded
        -- and sent (publish.lua).
        local attempt
        local n = tonumber(seq)
        if lost and n > lost[1] and n <= lost[2] then attempt = tonumber(redis.call('HGET', K[3], eid)) end
        if not attempt then
          attempt = redis.call('HINCRBY', K[3], eid, '1')
          if attempt == 1 and n <= sentOnce then attempt = redis.call('HINCRBY', K[3], eid, '1') end
        end
        -- Appended once its counter is raised: a failure after it leaves it in the take record.
        send[#send + 1] = eid
        send[#send + 1] = seq
        send[#send + 1] = attempt
        send[#send + 1] = payload
        want = want - 1
      end
    end
    -- Fewer than asked: the outbox has nothing more (only expired events make another round).
    if #batch < 2 * asked then break end
  end
  -- The attempt counters and the mark expire with the outbox they belong to.
  if #send > 0 then
    -- Numbers as strings, as in publish.lua: the TTL formatted once, the sequence as the
    -- range returned it.
    -- In milliseconds: the mark must not outlive the sequence counter, which has q's life
    -- (publish.lua, where the outbox's TTL is refreshed).
    -- Less a second, as there: SET reads the clock again, which may have moved on.
    local ttl = redis.call('PTTL', K[1])
    local ttlS = string.format('%d', ttl)
    if ttl > 0 then redis.call('PEXPIRE', K[3], ttlS) end
    local lastS = send[#send - 2]
    if tonumber(lastS) > mark then
      if ttl > 0 then
        redis.call('SET', K[7], lastS, 'PX', string.format('%d', math.max(1, ttl - 1000)))
      else
        redis.call('SET', K[7], lastS)
      end
    end
  end
end

local a = 1
local results = {}
while a <= #A do
  local sid = A[a]
  local want, nacks, nbare = tonumber(A[a + 2]), tonumber(A[a + 3]), tonumber(A[a + 4])
  local r = { 0, EMPTY, EMPTY, EMPTY, 0, 0 }
  takenFrom, takenLost = 0, false
  local ok, err = pcall(pumpSession, r, sid, A[a + 1], want, nacks, nbare, tonumber(A[a + 5]), a + 6)
  a = a + 6 + nacks + nbare
  -- A failed session's answer says why (its 7th field); what it removed before is reported as
  -- any other's (its receipts and expired events: gone from the outbox), what it took is in the
  -- take record (its counters were raised) and not sent.
  if not ok then r[7] = ownError(err) end
  results[#results + 1] = r
  local send = r[3]
  local lost = takenLost
  if takeRecord and (#send > 0 or lost) then
    local from, to = takenFrom, 0
    if #send > 0 then to = tonumber(send[#send - 2]) end
    if lost then
      if lost[1] < from then from = lost[1] end
      if lost[2] > to then to = lost[2] end
    end
    took = took or {}
    took[#took + 1] = sid
    took[#took + 1] = from
    took[#took + 1] = to
  end
  if receipt and (#r[2] > 0 or #r[4] > 0) then
    kept = kept or {}
    kept[#kept + 1] = sid
    kept[#kept + 1] = r[2]
    kept[#kept + 1] = r[4]
  end
end
if kept then
  redis.call('SET', receipt, cmsgpack.pack(kept))
  redis.call('ZADD', owed, ARGV[1], receipt)
end
if took then redis.call('SET', takeRecord, cmsgpack.pack(took), 'PX', '300000') end
return cmsgpack.pack(results)
