--[[
  One membership of a session leaves a room (room-join.lua), in one round trip: a membership
  that is not there (already left, swept, or whose join never ran) changes nothing, so a leave
  may be sent again until Redis answers it. The session leaves the room with its last
  membership there.

  KEYS[1] ZSET  the room's members (session id -> memberships in the room)
  KEYS[2] HASH  the session's memberships (`room token node` -> username)
  KEYS[3] ZSET  rooms (room -> members)
  ARGV[1] session id
  ARGV[2] room
  ARGV[3] the membership (`room token node`)

  Returns {last, members}: last = 1 when the session left the room.
]]
if redis.call('HDEL', KEYS[2], ARGV[3]) == 0 then
  return {0, redis.call('ZCARD', KEYS[1])}
end
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
