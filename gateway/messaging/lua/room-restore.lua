--[[
  Writes one membership of this node again (Redis came back and may have lost it) and the
  session's score in the room from the memberships it has there, whichever of the keys Redis
  kept.

  KEYS[1] ZSET  the room's members
  KEYS[2] HASH  the session's memberships (`room token node` -> username)
  KEYS[3] ZSET  rooms (room -> members)
  KEYS[4] SET   the sessions holding a membership of this node (room-join.lua)
  KEYS[5] SET   the `session room` pairs a sweep of this node told `room.left` (sweep-session.lua)
  ARGV[1] session id
  ARGV[2] room
  ARGV[3] the membership (`room token node`)
  ARGV[4] username
  ARGV[5] the room's channel
  ARGV[6] the `room.joined` to publish there if the session was told gone ('' to tell nothing:
          the default room)

  When the session was not in the room and a sweep of this node had told the room it left (the
  node was swept while it still ran), the room is told `room.joined`, in the same step as the
  write, and 1 is returned; else 0.
]]
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[1])
local n, head = 0, ARGV[2] .. ' '
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(f, 1, #head) == head then n = n + 1 end
end
redis.call('ZADD', KEYS[1], n, ARGV[1])
redis.call('ZADD', KEYS[3], redis.call('ZCARD', KEYS[1]), ARGV[2])
if not before and redis.call('SREM', KEYS[5], ARGV[1] .. ' ' .. ARGV[2]) == 1 then
  if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
  return 1
end
return 0
