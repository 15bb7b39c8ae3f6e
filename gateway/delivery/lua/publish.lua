--[[
  Adds qos-1 events to session outboxes and tells the nodes holding the sessions. One call
  carries the publishes a process made since its last call (outbox.ts batches them, one call
  out at a time); each event is applied in order, exactly as if it had its own call, and the
  whole call is atomic.

  Each event names its target, and the script expands it to sessions in the same step, so a
  publish costs one round trip and nothing before it (docs/ARCHITECTURE.md, "One Redis
  primary"). The keys of those sessions are built here, from the key scheme of keys.ts
  (head .. sid .. tail .. name): the call touches keys it does not declare, which needs one Redis
  primary, not Redis Cluster. No KEYS.

  ARGV[1] outbox bound
  ARGV[2] policy at the bound: "reject" or "drop-oldest"
  ARGV[3] key TTL (s)
  ARGV[4] node channel prefix
  ARGV[5] the calling node's id ("" when the caller holds no connection)
  ARGV[6], ARGV[7] head and tail of a session's key names (Keys.sessionKeyParts)
  ARGV[8] the expiries ZSET (`sid|eid` -> expiry ms)
  ARGV[9] the events: a MessagePack array of strings (script-args.ts; read with
  cmsgpack.unpack), per event: kind, target, eid, packed event, flags, expiry ms or "0", the
  number of claims n, then n pairs: session id, claim
    flags "0" / "1": no receipt / a receipt; "2" / "3": the same, and the eid was made for this
    publish (a random UUID), so no outbox can hold it and it is not looked for (an eid the
    publisher chose is looked for: publishing it again is a no-op)
    kind "s": target is a session id
    kind "k": target is a STRING key holding a session id (a device key)
    kind "u": target is a user's SET of session ids; ids of sessions found gone are removed
    kind "r": target is a room's ZSET of member session ids
  ARGV[10] "1" if a target comes more than once in ARGV[9] (its sessions' events are then held
  and written together, see below), else "0"
  ARGV[11] the in-flight window (GW_MAX_INFLIGHT) for forwarding, "0": never forward (below)
  ARGV[12] forward channel prefix (Keys.forwardChannel)
  ARGV[13] bytes of forwards per node and call at most (what a subscriber's output buffer takes
  at once); the sessions past it are woken
  ARGV[14], ARGV[15], ARGV[16] the drop receipts' prefix (Keys.dropReceipt), the owed reports
  ZSET (Keys.owedReports) and now (ms), or absent: an event dropped at the bound (drop-oldest)
  is kept under `<prefix><sid>:<eid>` as cmsgpack {sid, payload}, noted in the ZSET, until its
  `delivery.dropped` is queued (the caller removes both; a caller that died first leaves them
  to the sweep)

  Keys of a session (head .. sid .. tail .. name):
    q     ZSET eid -> sequence (publish order)
    ev    HASH eid -> packed event
    att   HASH eid -> attempts so far, for events the pump or a retry sent; an event without
          an entry was sent once, from its publish, if its sequence is at or below the sent
          mark, else never (see below)
    rc    SET  eids whose acks are reported to the back end
    exp   HASH eid -> expiry (ms)
    seq   STRING sequence counter
    node  STRING node holding the session (absent when offline)
    sess  HASH the live session (identity); absent: the session is gone
    sent  STRING the highest sequence sent to a connection of the session (see ack-pump.lua)

  A claim (docs/ARCHITECTURE.md, "Sending from the publish") is the last sequence sent on the
  calling node's connection of that session, and asks to send the event from the publish
  itself. The script grants it when the session's node key names the caller, no event of the
  outbox lies between the claim and this event (everything before it was sent on that
  connection, or is gone), and the sent mark lies between the claim and this event (no
  rollback). A granted event counts as sent, as by ack-pump: the sent mark becomes its
  sequence, and that alone records its first attempt (no `att` entry is written: the scripts
  that count attempts take a missing entry at or below the mark as 1); the node gets no
  wake-up for it. Later claimed events of the
  same session in the call chain on from the last granted one.

  A forward (docs/ARCHITECTURE.md, "Sending from the publish, across nodes") is the same for a
  session held by another node: when everything before the event was sent (the sent mark is the
  sequence before it) and the events waiting for an ack leave a slot in the window, the mark
  becomes its sequence, as for a grant, and the event goes to the holding node on its forward
  channel (sid \n eid \n seq \n bare .. packed event, bare "1" without a receipt or an
  expiry) instead of a wake-up. That node sends it when its connection was sent everything
  before it and nothing else of the session is under way; otherwise it pumps, telling the pump
  that the event was not sent (ack-pump.lua, `unsent from`). A node with no subscriber on that
  channel (`PUBSUB NUMSUB`, once per node and call: one of an earlier version, or whose
  subscriber is away) gets no forward: the mark stays, the node is woken, as without it. (Not
  PUBLISH's count, which counts pattern subscribers too, such as an operator's PSUBSCRIBE.)
  A call forwards at most ARGV[13] bytes to one node: a room's event for thousands of sessions
  would otherwise fill the node's subscriber output buffer at once (Redis cuts a subscriber past
  its `client-output-buffer-limit pubsub`); the sessions past it are woken, as without forwards.

  Returns one string, a MessagePack array packed with cmsgpack (script-reply.ts), of: per event,
  the number of sessions the target expanded to, then 6 per session:
  session id, status, node|false, droppedEid|false, droppedPayload|false, sequence|false
    status 2 = added and the claim granted (the caller sends it), 1 = added, 0 = duplicate eid
    (no-op), -1 = rejected at the bound, -2 = no such session, -3 = failed: a key of the session
    holds another type than the script uses (WRONGTYPE), and the sixth field is Redis's error
  or, for an event whose target key (a device key, a user's or a room's set) holds another type,
  -1 and the error.
  A session gets at most one wake-up message per call, however many events it got.

  A session whose keys hold another type (written by something else: an operator's command, a
  partial restore, a bug) fails its own part only (ownError, includes/own-error.lua): each
  session's part of an event runs under pcall (step), so the publishers of the other sessions and
  events in the call are answered as without it, and the failed session takes nothing more in
  the call; any other error fails the call as a whole. What its part wrote before the failure
  stays (a script's writes are not undone), as does a forward it published; events held for it
  (above) and never written are answered failed, a grant among them not sent.
]]
local bound, policy, ttl, channel, me = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local window, forwards, budget = tonumber(ARGV[11] or '0'), ARGV[12], tonumber(ARGV[13] or '0')
-- Per node: whether it listens on its forward channel (read once per call), and the bytes
-- forwarded to it in this call.
local listening, forwardedBytes = {}, {}
local function listens(node)
  local l = listening[node]
  if l == nil then
    l = redis.call('PUBSUB', 'NUMSUB', forwards .. node)[2] > 0
    listening[node] = l
  end
  return l
end
local head, tail, expiries = ARGV[6], ARGV[7], ARGV[8]
local dropReceipts, owed, nowMs = ARGV[14], ARGV[15], ARGV[16]
-- Numbers go to redis.call as strings made once: Lua turns a number argument into text with
-- sprintf("%.14g"), which is a large share of a call's time (bench/RESULTS.md, "number
-- arguments"); string.format('%d') of an integer is not.
local ttlS = ARGV[3]

-- Key names per session, built once per call; att, rc and exp (K[3], K[4], K[5]) only when a
-- receipt, an expiry or a drop needs them (`key`): each name is a new Lua string, and most
-- events need neither.
local keysOf = {}
local NAMES = { 'q', 'ev', 'att', 'rc', 'exp', 'seq', 'node', 'sess', 'sent' }
local function sessionKeys(sid)
  local K = keysOf[sid]
  if not K then
    local b = head .. sid .. tail
    K = { b .. 'q', b .. 'ev', false, false, false, b .. 'seq', b .. 'node', b .. 'sess', b .. 'sent', base = b }
    keysOf[sid] = K
  end
  return K
end
local function key(K, i)
  local k = K[i]
  if not k then
    k = K.base .. NAMES[i]
    K[i] = k
  end
  return k
end

-- A device key's session, and a user's or a room's sessions, read once per call (only this
-- call could change them, and it changes only a user's, as it keeps here: below).
local deviceSession = {}
local members = {}

-- A device key's session id (false: none).
local function deviceSessionOf(target)
  local sid = deviceSession[target]
  if sid == nil then
    sid = redis.call('GET', target)
    deviceSession[target] = sid
  end
  return sid
end

-- A user's or a room's session ids.
local function membersOf(kind, target)
  local m = members[target]
  if not m then
    if kind == 'u' then m = redis.call('SMEMBERS', target) else m = redis.call('ZRANGE', target, 0, -1) end
    members[target] = m
  end
  return m
end

-- The outbox's TTL is refreshed when it has run down by `slack` seconds, not by every call: a
-- TTL read instead of three EXPIREs (q and ev are created and emptied together, and every
-- refresh sets q, ev and seq at once, so q's TTL stands for the three, and for the sent mark).
local slack = math.min(60, math.floor(ttl / 10))
-- The sent mark is given what the counter has left less MARK_MARGIN_MS: SET and EXPIRE each
-- read the clock, which may move a millisecond or two within one call, and a mark that
-- outlives the counter even by that stalls (below); one that goes a second early is a rollback.
local MARK_MARGIN_MS = 1000
local ttlMs, slackMs = ttl * 1000, slack * 1000
local ttlPx = string.format('%d', math.max(1, ttlMs - MARK_MARGIN_MS))

-- Per session, what this call already read or did. The call is atomic, so what it read stays
-- true but for its own writes, which it keeps here too: alive (its session record exists), size
-- (of q, held events included), node (false: none), mark (the sent mark), seq (the last
-- sequence given), ttl/rc/exp (TTLs seen to), granted (the last grant's sequence, or '-1' once
-- the chain broke), woken (the wake-up went), held (see below).
local state = {}

-- When the caller says a target comes more than once in the call (ARGV[10] "1"), a session's
-- new events are held and written once per call: one ZADD to q, one HSET to ev,
-- one INCRBY of the sequences given after the first (which INCR gave), one SET of the mark,
-- and the TTLs of an outbox the call created, instead of four commands per event. The call is
-- atomic, so nothing outside it can tell; inside it, a read that could need the held events
-- (the oldest event at the bound, the count between a claim and an event) writes them first,
-- and a duplicate eid is looked for among them too. Fields of a session's state: held (how
-- many), hq/hev (their ZADD and HSET arguments), heids (the set of their eids), extra
-- (sequences given since INCR), expire, hmark (the mark to set). Otherwise (every target once:
-- the usual call at a steady rate, where a session gets one event per call) each is written as
-- it comes, which costs Redis less for a lone event than holding it (bench/RESULTS.md, "a
-- call's events written together"); different targets that reach one session are then right
-- too, only not merged.
local holding = ARGV[10] == '1'
local function write(K, d)
  -- (held is nil in a call that holds nothing)
  if not d.held or d.held == 0 then return end
  redis.call('ZADD', K[1], unpack(d.hq))
  redis.call('HSET', K[2], unpack(d.hev))
  if d.extra > 0 then redis.call('INCRBY', K[6], string.format('%d', d.extra)) end
  if d.expire then
    redis.call('EXPIRE', K[1], ttlS)
    redis.call('EXPIRE', K[2], ttlS)
    redis.call('EXPIRE', K[6], ttlS)
  end
  if d.hmark then redis.call('SET', K[9], d.hmark, 'PX', d.ttl) end
  d.held, d.extra, d.expire, d.hmark, d.hq, d.hev, d.heids, d.heldFrom = 0, 0, false, false, false, false, false, false
end

local function hold(d, seqS, eid, payload)
  if d.held == 0 then d.hq, d.hev, d.heids = {}, {}, {} end
  local q, ev = d.hq, d.hev
  q[#q + 1] = seqS
  q[#q + 1] = eid
  ev[#ev + 1] = eid
  ev[#ev + 1] = payload
  d.heids[eid] = true
  d.held = d.held + 1
end

-- Held events per session at most (twice as many ZADD/HSET arguments: a Lua call's stack is
-- bounded).
local HOLD = 256
-- The answer, and its length (kept: `#out` searches for the border on every append).
local out, no = {}, 0

-- A session's part of an event failed (`err`, ownError's message): the session takes nothing
-- more in this call, and its events held since its last write, never written, are answered
-- failed too: those of the answer from d.heldFrom (the count of the event that held the first
-- of them) on that were added. Failures are rare: the answer is walked then, rather than each
-- held event's place kept. Returns `err`.
local function fail(sid, d, err)
  d.failed = err
  local pos = d.heldFrom
  while pos and pos <= no do
    local count = out[pos]
    if count < 0 then
      pos = pos + 2
    else
      for e = pos + 1, pos + 6 * count, 6 do
        if out[e] == sid and out[e + 1] > 0 then out[e + 1], out[e + 2], out[e + 5] = -3, false, err end
      end
      pos = pos + 1 + 6 * count
    end
  end
  d.held, d.heldFrom = 0, false
  return err
end

-- One session's part of one event (its session alive): stores the event, grants its claim or
-- forwards it, wakes the session's node. Run under pcall: a key of the session holding another
-- type fails this part alone (below). Returns status, node, droppedEid, droppedPayload, seq.
-- The event's fields, set per event by the loop below.
local eid, payload, receipt, newEid, expiry, claims, claimSid, claimAfter
local function step(sid, d, K)
  local status, node, droppedEid, droppedPayload, seq = 1, false, false, false, false
  if not d.size then d.size = redis.call('ZCARD', K[1]) end
  -- An empty outbox holds no eid (q and ev are filled and emptied together), and no outbox
  -- holds an eid made for this publish: no look-up.
  local dup
  if newEid then
    dup = false
  elseif holding then
    dup = (d.held > 0 and d.heids[eid]) or (d.size > d.held and redis.call('HEXISTS', K[2], eid) == 1)
  else
    dup = d.size > 0 and redis.call('HEXISTS', K[2], eid) == 1
  end
  if dup then
    status = 0
  else
    local full = d.size >= bound
    if full and policy == 'reject' then
      status = -1
    end
    if full and status == 1 then
      write(K, d)
      droppedEid = redis.call('ZRANGE', K[1], 0, 0)[1]
      droppedPayload = redis.call('HGET', K[2], droppedEid)
      redis.call('ZREM', K[1], droppedEid)
      redis.call('HDEL', K[2], droppedEid)
      redis.call('HDEL', key(K, 3), droppedEid)
      redis.call('SREM', key(K, 4), droppedEid)
      redis.call('HDEL', key(K, 5), droppedEid)
      if dropReceipts then
        local r = dropReceipts .. sid .. ':' .. droppedEid
        redis.call('SET', r, cmsgpack.pack({sid, droppedPayload}))
        redis.call('ZADD', owed, nowMs, r)
      end
      d.size = d.size - 1
    end
  end
  if status == 1 then
    -- An empty outbox has no q or ev key: this event creates them, without a TTL.
    local created = d.size == 0
    local seqS
    if not holding then
      seq = redis.call('INCR', K[6])
      seqS = string.format('%d', seq)
      redis.call('ZADD', K[1], seqS, eid)
      redis.call('HSET', K[2], eid, payload)
    else
      if d.seq then
        seq = d.seq + 1
        d.extra = d.extra + 1
      else
        seq = redis.call('INCR', K[6])
      end
      seqS = string.format('%d', seq)
      hold(d, seqS, eid, payload)
    end
    d.seq = seq
    d.size = d.size + 1
    if receipt then redis.call('SADD', key(K, 4), eid) end
    if expiry ~= '0' then
      redis.call('HSET', key(K, 5), eid, expiry)
      redis.call('ZADD', expiries, expiry, sid .. '|' .. eid)
    end
    -- The outbox lives as long as a session could: a call that publishes to it sees that
    -- its keys have at least `ttl - slack` seconds left (once per key and call).
    -- (Set when the held events are written, after the keys exist.) d.ttl keeps what the
    -- sequence counter has left, in milliseconds, for the sent mark: the mark must never
    -- outlive the counter. A counter gone under a mark still there would start again at 1,
    -- below the mark and a live connection's claim, and its events would be neither granted
    -- nor taken by that connection's pump (which takes past the claim) until the sequence
    -- passed the mark again. A mark gone first is a rollback (ack-pump.lua): the pump starts
    -- over.
    if not d.ttl then
      local left = created and -2 or redis.call('PTTL', K[1])
      if left < ttlMs - slackMs then
        d.ttl = ttlPx
        if holding then
          d.expire = true
        else
          redis.call('EXPIRE', K[1], ttlS)
          redis.call('EXPIRE', K[2], ttlS)
          redis.call('EXPIRE', K[6], ttlS)
        end
      else
        d.ttl = string.format('%d', math.max(1, left - MARK_MARGIN_MS))
      end
    end
    if receipt and not d.rc then
      d.rc = true
      redis.call('EXPIRE', key(K, 4), ttlS)
    end
    if expiry ~= '0' and not d.exp then
      d.exp = true
      redis.call('EXPIRE', key(K, 5), ttlS)
    end
    -- The node and the sent mark in one read (both strings; the mark is needed only for a
    -- claim or a forward, and most calls that reach here make one).
    if d.node == nil then
      local nm = redis.call('MGET', K[7], K[9])
      d.node = nm[1]
      if not d.mark then d.mark = tonumber(nm[2] or '0') end
    end
    node = d.node
    local claim
    if claims then claim = claims[sid] elseif claimSid == sid then claim = claimAfter end
    local after = d.granted or claim
    local grant = claim ~= nil and after ~= '-1' and node == me
    if grant then
      local from = tonumber(after)
      -- Chained on the grant just before it in this call (the mark is that grant): nothing
      -- can lie between the two, and the count is not needed.
      grant = d.mark >= from and d.mark < seq
      if grant and from ~= seq - 1 then
        -- Held events of this session would be in the range: written first. (None are, in
        -- practice: after a held event of the session the chain is on it or broken.)
        write(K, d)
        grant = redis.call('ZCOUNT', K[1], '(' .. after, '(' .. seqS) == 0
      end
    end
    if grant then
      status = 2
      d.granted = seqS
      d.mark = seq
      if holding and d.held > 0 then d.hmark = seqS else redis.call('SET', K[9], seqS, 'PX', d.ttl) end
    end
    -- Forwarded (d.size counts this event: the ones before it, all sent and not acked, leave a
    -- slot). The chain goes on: the next event of the session here finds the mark before it.
    local forwarded = not grant and window > 0 and node and node ~= me and d.granted ~= '-1'
      and d.mark == seq - 1 and d.size <= window and listens(node)
    local message
    if forwarded then
      local bare = (receipt or expiry ~= '0') and '0' or '1'
      message = sid .. '\n' .. eid .. '\n' .. seqS .. '\n' .. bare .. payload
      local bytes = (forwardedBytes[node] or 0) + #message
      forwarded = bytes <= budget
      if forwarded then forwardedBytes[node] = bytes end
    end
    if forwarded then
      redis.call('PUBLISH', forwards .. node, message)
      d.mark = seq
      if holding and d.held > 0 then d.hmark = seqS else redis.call('SET', K[9], seqS, 'PX', d.ttl) end
    elseif not grant then
      -- A refused or missing claim ends the chain: the pump sends this event, and so
      -- everything after it.
      d.granted = '-1'
      if node and not d.woken then
        d.woken = true
        redis.call('PUBLISH', channel .. node, 'n' .. sid)
      end
    end
  end
  if holding and d.held >= HOLD then write(K, d) end
  return status, node, droppedEid, droppedPayload, seq
end

local A = cmsgpack.unpack(ARGV[9])
local a = 1
while a <= #A do
  local kind, target, flags = A[a], A[a + 1], A[a + 4]
  eid, payload, expiry = A[a + 2], A[a + 3], A[a + 5]
  receipt = flags == '1' or flags == '3'
  newEid = flags == '2' or flags == '3'
  local n = tonumber(A[a + 6])
  -- The claims: most events carry none or one, which need no table.
  claims, claimSid, claimAfter = nil, nil, nil
  if n == 1 then
    claimSid, claimAfter = A[a + 7], A[a + 8]
  elseif n > 1 then
    claims = {}
    for c = a + 7, a + 5 + 2 * n, 2 do
      claims[A[c]] = A[c + 1]
    end
  end
  a = a + 7 + 2 * n
  -- A session or a device reaches one session at most (single: its id, or false), a user or a
  -- room a list: no table per event for the first two.
  -- (Read under pcall the first time only: a target read before is in the call's tables.)
  local single, list, ok, res = false, nil, true, nil
  if kind == 's' then
    single = target
  elseif kind == 'k' then
    single = deviceSession[target]
    if single == nil then
      ok, res = pcall(deviceSessionOf, target)
      single = ok and res
    end
  else
    list = members[target]
    if not list then
      ok, res = pcall(membersOf, kind, target)
      list = ok and res or nil
    end
  end
  local count = list and #list or (single and 1 or 0)
  local gone = nil
  local eventAt = no + 1
  no = no + 1
  if not ok then
    -- The target's key holds another type: this event fails alone, with the error.
    count = 0
    out[no] = -1
    no = no + 1
    out[no] = ownError(res)
  else
    out[no] = count
  end
  for i = 1, count do
    local sid = single or list[i]
    local K = sessionKeys(sid)
    local d = state[sid]
    if not d then
      -- The fields most calls set named here (nil and false included), so that the table is
      -- made at its size rather than grown.
      if holding then
        d = {
          alive = redis.call('EXISTS', K[8]) == 1, size = false, ttl = false, node = nil, mark = false,
          granted = false, seq = false, held = 0, extra = 0,
        }
      else
        d = {
          alive = redis.call('EXISTS', K[8]) == 1, size = false, ttl = false, node = nil, mark = false,
          granted = false, seq = false,
        }
      end
      state[sid] = d
    end
    local status, node, droppedEid, droppedPayload, seq = 1, false, false, false, false
    if not d.alive then
      status = -2
      gone = gone or {}
      gone[#gone + 1] = sid
    elseif d.failed then
      -- Failed earlier in this call: takes nothing more in it.
      status, seq = -3, d.failed
    else
      local ok
      ok, status, node, droppedEid, droppedPayload, seq = pcall(step, sid, d, K)
      if not ok then
        seq = fail(sid, d, ownError(status))
        status, node, droppedEid, droppedPayload = -3, false, false, false
      elseif holding and status > 0 and d.held > 0 and not d.heldFrom then
        -- The first event held since the session's last write: where the answer's events that
        -- a failed write would fail start (fail).
        d.heldFrom = eventAt
      end
    end
    out[no + 1], out[no + 2], out[no + 3] = sid, status, node or false
    out[no + 4], out[no + 5], out[no + 6] = droppedEid, droppedPayload, seq
    no = no + 6
  end
  if kind == 'u' and gone then
    redis.call('SREM', target, unpack(gone))
    local left = {}
    for _, sid in ipairs(list) do
      if state[sid].alive then left[#left + 1] = sid end
    end
    members[target] = left
  end
end
if holding then
  for sid, d in pairs(state) do
    if d.held and d.held > 0 then
      local ok, err = pcall(write, sessionKeys(sid), d)
      if not ok then fail(sid, d, ownError(err)) end
    end
  end
end
return cmsgpack.pack(out)
