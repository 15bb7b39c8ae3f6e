--[[
  Removes events from a session's outbox and returns them (dead letters, expiry sweep, the end
  of a session). Only the caller that removes an event gets it back, so each is reported once.

  KEYS[1..6] as in publish.lua (q, ev, att, rc, exp, seq)
  ARGV[1] "all" to take every event, "some", or "peek": every event returned and none removed
          (a purge reports them before it takes them, so that a report Redis refuses leaves
          them there for the purge's next try); or "kept": as "some", and what it took is also
          kept under a receipt key, as `<#eid>:<eid><attempts>:<#payload>:<payload>` each, noted
          in the owed reports ZSET: the node removes both once it dead-lettered them (a reply
          lost to Redis slow or frozen past its timeout, or a node that died first, leaves them
          to its retry or to the sweep)
  ARGV[2..] eids (with "some"); with "kept", ARGV[2] the receipt key, ARGV[3] the owed reports
          ZSET (Keys.owedReports), ARGV[4] now (ms), ARGV[5..] the eids

  Returns {eid, attempts, payload, ...}; an event with no attempt entry at or below the sent
  mark (the session's `sent` key, next to q) was sent once, from its publish (publish.lua). An
  event whose payload is gone while its index entry stayed (evicted or deleted apart, a write
  that failed part-way: ack-pump.lua's `unreadable`) is removed all the same and returned as
  {eid, -1, false} (not kept under the receipt); "peek" leaves it out.
]]
local eids
local kept = ARGV[1] == 'kept'
if ARGV[1] == 'all' or ARGV[1] == 'peek' then
  eids = redis.call('ZRANGE', KEYS[1], 0, -1)
else
  eids = {}
  for i = kept and 5 or 2, #ARGV do eids[#eids + 1] = ARGV[i] end
end
local out = {}
local mark
for _, eid in ipairs(eids) do
  local seq = redis.call('ZSCORE', KEYS[1], eid)
  if seq then
    local attempts = tonumber(redis.call('HGET', KEYS[3], eid) or '0')
    if attempts == 0 then
      mark = mark or tonumber(redis.call('GET', string.sub(KEYS[1], 1, -2) .. 'sent') or '0')
      if tonumber(seq) <= mark then attempts = 1 end
    end
    local payload = redis.call('HGET', KEYS[2], eid)
    if payload then
      out[#out + 1] = eid
      out[#out + 1] = attempts
      out[#out + 1] = payload
    elseif ARGV[1] ~= 'peek' then
      out[#out + 1] = eid
      out[#out + 1] = -1
      out[#out + 1] = false
    end
    if ARGV[1] ~= 'peek' then removeEvent(KEYS, eid) end
  end
end
if ARGV[1] == 'all' then
  for i = 1, 6 do redis.call('DEL', KEYS[i]) end
end
if kept and #out > 0 then
  local parts = {}
  for i = 1, #out, 3 do
    if out[i + 2] then
      parts[#parts + 1] = #out[i] .. ':' .. out[i] .. out[i + 1] .. ':' .. #out[i + 2] .. ':' .. out[i + 2]
    end
  end
  if #parts > 0 then
    redis.call('SET', ARGV[2], table.concat(parts))
    redis.call('ZADD', ARGV[3], ARGV[4], ARGV[2])
  end
end
return out
