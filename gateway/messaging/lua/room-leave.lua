--[[
  One connection of a session leaves a room (or, with ARGV[3] = '1', the whole session does:
  its node died), in one round trip. The session leaves when it was its last connection there.

  KEYS[1] ZSET  the room's members (session id -> connections in the room)
  KEYS[2] SET   the rooms of the session
  KEYS[3] ZSET  rooms (room -> members)
  ARGV[1] session id
  ARGV[2] room
  ARGV[3] '1' to remove the session whatever its count, else ''

  Returns {last, members}: last = 1 when the session left the room.
]]
if ARGV[3] ~= '1' then
  if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    return {0, redis.call('ZCARD', KEYS[1])}
  end
  local left = tonumber(redis.call('ZINCRBY', KEYS[1], -1, ARGV[1]))
  if left > 0 then return {0, redis.call('ZCARD', KEYS[1])} end
end
local last = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
local members = redis.call('ZCARD', KEYS[1])
if members > 0 then
  redis.call('ZADD', KEYS[3], members, ARGV[2])
else
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return {last, members}
