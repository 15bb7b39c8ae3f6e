--[[
  Removes what a dead node held of one session, and nothing else, in one step (the presence
  sweep, presence.ts): its room memberships (`room token node` fields of the session's
  memberships hash whose node is the dead one), its presence record and its node key if they
  are still the dead node's. A session that resumed on a live node, before the sweep or while
  it runs, keeps that node's record, key and memberships.

  KEYS[1] HASH  presence (session id -> JSON record)
  KEYS[2] HASH  last seen (username -> ms)
  KEYS[3] STRING the session's node key
  KEYS[4] HASH  the session's memberships (`room token node` -> username)
  KEYS[5] ZSET  rooms (room -> members)
  ARGV[1] session id
  ARGV[2] the dead node
  ARGV[3] now (ms)
  ARGV[4] ARGV[5] a room's members key is ARGV[4] .. room .. ARGV[5]

  Returns {username, rooms...}: the rooms the session left (its last membership there was the
  dead node's); username '' when neither a record nor a membership named it.
]]
local sid, node = ARGV[1], ARGV[2]
local username = ''
local raw = redis.call('HGET', KEYS[1], sid)
if raw then
  local rec = cjson.decode(raw)
  username = rec.username or ''
  if rec.node == node then
    redis.call('HDEL', KEYS[1], sid)
    redis.call('HSET', KEYS[2], username, ARGV[3])
  end
end
if redis.call('GET', KEYS[3]) == node then redis.call('DEL', KEYS[3]) end
local left = {}
local fields = redis.call('HGETALL', KEYS[4])
for i = 1, #fields, 2 do
  local f = fields[i]
  local room, holder = string.match(f, '^(%S+) %d+ (.*)$')
  if room and holder == node then
    if username == '' then username = fields[i + 1] end
    redis.call('HDEL', KEYS[4], f)
    local key = ARGV[4] .. room .. ARGV[5]
    if tonumber(redis.call('ZINCRBY', key, -1, sid)) <= 0 then
      redis.call('ZREM', key, sid)
      left[#left + 1] = room
    end
    local members = redis.call('ZCARD', key)
    if members > 0 then
      redis.call('ZADD', KEYS[5], members, room)
    else
      redis.call('ZREM', KEYS[5], room)
    end
  end
end
local out = {username}
for _, room in ipairs(left) do out[#out + 1] = room end
return out
