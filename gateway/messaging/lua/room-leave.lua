--[[
  One membership of a session leaves a room (room-join.lua), in one round trip: a membership
  that is not there (already left, swept, or whose join never ran) changes nothing, so a leave
  may be sent again until Redis answers it. The session leaves the room with its last
  membership there, and the room's members are told so here, by the step that made it leave:
  a leave that ran late (sent to a frozen Redis, its answer lost) is told all the same, and a
  leave sent again finds nothing and tells nothing.

  KEYS[1] ZSET  the room's members (session id -> memberships in the room)
  KEYS[2] HASH  the session's memberships (`room token node` -> username)
  KEYS[3] ZSET  rooms (room -> members)
  KEYS[4] SET   the sessions holding a membership of the membership's node (room-join.lua),
                left by the session with its last membership of that node
  ARGV[1] session id
  ARGV[2] room
  ARGV[3] the membership (`room token node`)
  ARGV[4] the room's channel
  ARGV[5] the `room.left` event to publish there if the session leaves (rooms.ts RoomWire,
          packed); '' tells nothing (the default room, a join undone)

  Returns {last, members}: last = 1 when the session left the room.
]]
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  return {0, redis.call('ZCARD', KEYS[1])}
end
-- Told before anything is written: a PUBLISH refused leaves the membership to the leave sent
-- again, which tells it then.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= 1 and ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
redis.call('HDEL', KEYS[2], ARGV[3])
local tail = ' ' .. string.match(ARGV[3], '^%S+ %d+ (.*)$')
local held = false
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(f, -#tail) == tail then
    held = true
    break
  end
end
if not held then redis.call('SREM', KEYS[4], ARGV[1]) end
local left = tonumber(redis.call('ZINCRBY', KEYS[1], -1, ARGV[1]))
if left > 0 then return {0, redis.call('ZCARD', KEYS[1])} end
local last = redis.call('ZREM', KEYS[1], ARGV[1])
local members = redis.call('ZCARD', KEYS[1])
if members > 0 then
  redis.call('ZADD', KEYS[3], members, ARGV[2])
else
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return {last, members}
