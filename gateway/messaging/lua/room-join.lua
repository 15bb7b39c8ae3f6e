--[[
  One connection of a session joins a room, in one round trip. Members are sessions scored by
  their connections in the room, so a takeover (new connection, same session) does not remove
  the session when the old connection goes.

  KEYS[1] ZSET  the room's members (session id -> connections in the room)
  KEYS[2] SET   the rooms of the session
  KEYS[3] ZSET  rooms (room -> members)
  KEYS[4] ZSET  the room's recent messages (score: ms)
  ARGV[1] session id
  ARGV[2] room
  ARGV[3] replay messages from this score on ('' for none)

  Returns {first, members, history}: first = 1 when the session was not in the room before.
]]
local n = tonumber(redis.call('ZINCRBY', KEYS[1], 1, ARGV[1]))
local members = redis.call('ZCARD', KEYS[1])
local first = 0
if n == 1 then
  first = 1
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], members, ARGV[2])
end
local history = {}
if ARGV[3] ~= '' then history = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[3], '+inf') end
return {first, members, history}
