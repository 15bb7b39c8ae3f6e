--[[
  qos-0 events: each sent to the sessions its target reaches that are online now, and stored
  nowhere. One call carries the qos-0 publishes a process made in one tick (outbox.ts batches
  them) and does what took, per event, a look-up of the sessions, one of their nodes and a
  pipeline of PUBLISHes: the target is expanded here, as publish.lua expands it, and the session
  keys are built from the key scheme of keys.ts (head .. sid .. tail .. name): one Redis
  primary, no KEYS.

  ARGV[1] node channel prefix
  ARGV[2], ARGV[3] head and tail of a session's key names (Keys.sessionKeyParts)
  ARGV[4] the calling node's id ("" when the caller holds no connection)
  ARGV[5] the events: a MessagePack array of strings (script-args.ts; read with
  cmsgpack.unpack), per event: kind, target, the event packed (its fields, as stored for qos 1)
    kind "s": target is a session id
    kind "k": target is a STRING key holding a session id (a device key)
    kind "u": target is a user's SET of session ids; ids of sessions found gone are removed
    kind "r": target is a room's ZSET of member session ids

  A session counts when its record exists; it is sent the event when its node key names a node:
  the caller's own sessions are returned for the caller to send to, the others get
  "e" .. sid .. "\n" .. event on their node's channel. Returns, per event,
  {sessions, sent, failed, sid..., (sid, error)...}: the sessions counted, those sent to, how
  many could not be because their node key holds another type (WRONGTYPE; each named at the end
  with Redis's error), and the caller's own among those sent to. An event whose target key (a
  device key, a user's or a room's set) holds another type has an error in its place. Such a
  key fails its own part only (ownError, includes/own-error.lua); any other error fails the call.
]]
local channel, head, tail, me = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local A = cmsgpack.unpack(ARGV[5])
local out = {}
-- A device key's or a user's or room's sessions, and a session's liveness and node, read once
-- per call (only this call could change them, and it changes only a user's set).
local sessionsOf = {}
local nodeOf = {}
-- The sessions an event's target reaches (read under pcall: a key of another type is the
-- event's own failure, returned as the error's text, with nil).
local function sessionsFor(kind, target)
  local sids = sessionsOf[target]
  if sids then return sids end
  local ok, r
  if kind == 's' then
    return { target }
  elseif kind == 'k' then
    ok, r = pcall(redis.call, 'GET', target)
    if ok then return r and { r } or {} end
  elseif kind == 'u' then
    ok, r = pcall(redis.call, 'SMEMBERS', target)
  else
    ok, r = pcall(redis.call, 'ZRANGE', target, '0', '-1')
  end
  if ok then return r end
  return nil, ownError(r)
end

-- A session's node: its id, '' when offline, false when the session is gone, or a table
-- holding Redis's error when its node key holds another type.
local function nodeFor(sid)
  local node = nodeOf[sid]
  if node ~= nil then return node end
  local base = head .. sid .. tail
  if redis.call('EXISTS', base .. 'sess') == 1 then
    local ok, n = pcall(redis.call, 'GET', base .. 'node')
    if ok then node = n or '' else node = { ownError(n) } end
  else
    node = false
  end
  nodeOf[sid] = node
  return node
end

for a = 1, #A, 3 do
  local kind, target, event = A[a], A[a + 1], A[a + 2]
  local sids, err = sessionsFor(kind, target)
  if not sids then
    out[#out + 1] = { err = err }
  else
    local r = { 0, 0, 0 }
    local live, gone, failed = {}, nil, nil
    for _, sid in ipairs(sids) do
      local node = nodeFor(sid)
      if node then
        live[#live + 1] = sid
        r[1] = r[1] + 1
        if type(node) == 'table' then
          -- Counted, not sent: named after the caller's own sessions.
          r[3] = r[3] + 1
          failed = failed or {}
          failed[#failed + 1] = sid
          failed[#failed + 1] = node[1]
        elseif node ~= '' then
          r[2] = r[2] + 1
          if node == me then
            r[#r + 1] = sid
          else
            redis.call('PUBLISH', channel .. node, 'e' .. sid .. '\n' .. event)
          end
        end
      elseif kind == 'u' then
        gone = gone or {}
        gone[#gone + 1] = sid
      end
    end
    if gone then redis.call('SREM', target, unpack(gone)) end
    -- A user's or room's later events in the call skip the sessions found gone.
    sessionsOf[target] = (kind == 'u' or kind == 'r') and live or sids
    if failed then
      for _, f in ipairs(failed) do r[#r + 1] = f end
    end
    out[#out + 1] = r
  end
end
return out
