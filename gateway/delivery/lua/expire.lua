--[[
  The expiry sweep's step (presence.ts) over due members of the expiries ZSET (`sid|eid` ->
  expiry ms, publish.lua), across sessions, in two calls:
    "peek" returns the due events still in their outboxes, none removed, for the sweep to
           report them (delivery.expired) before anything is removed: a report Redis refuses
           leaves them for the next sweep;
    "take" then removes them, and their members, and returns how many events it removed (an
           event the ack pump found expired and removed meanwhile is not counted twice). That
           number is also kept under the receipt key for a minute when it is not 0: the node
           reads it there when the reply is lost (Redis slow or frozen past its timeout).
  A member is due when its score is at or below now; one whose event is gone (acked, moved,
  purged) is only dropped from the index by "take".

  Keys of a session are built here from its id, as publish.lua does (head .. sid .. tail ..
  name): one Redis primary, not Redis Cluster. No KEYS.

  ARGV[1] "peek" or "take"
  ARGV[2], ARGV[3] head and tail of a session's key names (Keys.sessionKeyParts)
  ARGV[4] the expiries ZSET
  ARGV[5] now (ms)
  ARGV[6] the receipt key ("take"; "" with "peek"), ARGV[7] how long it is kept (ms)
  ARGV[8..] members

  Returns, with "peek", {member, payload, ...}; with "take", the number of events removed, or,
  when the step of a member failed (a key of its session Redis cannot use: WRONGTYPE), {removed,
  member, error, ...} of those members, which left the index with their events in place. A
  failed member is left out of "peek"'s reply.
]]
local mode, head, tail, expiries, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local receipt, keepMs = ARGV[6], ARGV[7]
local out, removed = {}, 0
-- Members whose step failed ("take"): member, error, ...
local failed

-- One member's step, run under pcall: a command on a key of its session that Redis cannot use
-- as this script does (a WRONGTYPE: a key of that name written by something else) ends that
-- member's step, not the call, which would otherwise fail at every sweep and stop the expiry of
-- every event after it.
local function step(member)
  local bar = string.find(member, '|', 1, true)
  local score = redis.call('ZSCORE', expiries, member)
  if not (score and tonumber(score) <= now) then return end
  local payload, K, eid = false, nil, nil
  if bar then
    local base = head .. string.sub(member, 1, bar - 1) .. tail
    K = { base .. 'q', base .. 'ev', base .. 'att', base .. 'rc', base .. 'exp' }
    eid = string.sub(member, bar + 1)
    payload = redis.call('HGET', K[2], eid)
  end
  if mode == 'peek' then
    if payload then
      out[#out + 1] = member
      out[#out + 1] = payload
    end
  else
    if payload then
      removeEvent(K, eid)
      removed = removed + 1
    end
    -- (A member that names no event, malformed included, leaves the index too.)
    redis.call('ZREM', expiries, member)
  end
end

for i = 8, #ARGV do
  local ok, err = pcall(step, ARGV[i])
  -- "peek" leaves it out (not reported); "take" drops it from the index all the same, so that
  -- the sweeps do not meet it again, and names it in the reply. Its event stays where it is.
  if not ok then
    local msg = ownError(err)
    if mode ~= 'peek' then
      redis.call('ZREM', expiries, ARGV[i])
      failed = failed or {}
      failed[#failed + 1] = ARGV[i]
      failed[#failed + 1] = msg
    end
  end
end
if mode == 'peek' then return out end
if removed > 0 and receipt ~= '' then redis.call('SET', receipt, removed, 'PX', keepMs) end
if failed then
  table.insert(failed, 1, removed)
  return failed
end
return removed
