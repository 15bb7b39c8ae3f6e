--[[
  One connection of a session joins a room, in one round trip. Each join is a membership of
  its own, a field of the session's memberships hash named after the room, a token unique on
  its node and the node (`room token node`): the connection's leave removes that membership
  and nothing else, and the sweep of a dead node removes the memberships it held and none of
  a live node's. Members are sessions scored by their memberships in the room, so a takeover
  (new connection, same session) does not remove the session when the old connection goes.
  A membership already there (the same join run again) is not counted twice. The session is
  in its node's set of sessions with memberships while it holds one there (room-leave.lua), so
  that the sweep of the node, dead, finds every membership it held.

  KEYS[1] ZSET  the room's members (session id -> memberships in the room)
  KEYS[2] HASH  the session's memberships (`room token node` -> username)
  KEYS[3] ZSET  rooms (room -> members)
  KEYS[4] ZSET  the room's recent messages (score: ms)
  KEYS[5] SET   the sessions holding a membership of the node (keys.ts nodeMemberships)
  ARGV[1] session id
  ARGV[2] room
  ARGV[3] replay messages from this score on ('' for none)
  ARGV[4] the membership (`room token node`)
  ARGV[5] username

  Returns {first, members, history}: first = 1 when the session was not in the room before.
]]
local first = 0
if redis.call('HSETNX', KEYS[2], ARGV[4], ARGV[5]) == 1 then
  redis.call('SADD', KEYS[5], ARGV[1])
  if tonumber(redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])) == 1 then first = 1 end
end
local members = redis.call('ZCARD', KEYS[1])
if first == 1 then redis.call('ZADD', KEYS[3], members, ARGV[2]) end
local history = {}
if ARGV[3] ~= '' then history = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[3], '+inf') end
return {first, members, history}
