--[[
  Removes what a dead node held of one session, and nothing else, in one step (the presence
  sweep, presence.ts): its room memberships (`room token node` fields of the session's
  memberships hash whose node is the dead one), its presence record and its node key if they
  are still the dead node's. A session that resumed on a live node, before the sweep or while
  it runs, keeps that node's record, key and memberships.

  The rooms the session leaves (its last memberships there were the dead node's) are told
  here, `room.left` on each room's channel but the default room's, before anything is written:
  a step that runs removes and tells together, and one that fails (a PUBLISH refused) leaves
  everything to the next sweep, which tells it then. Told by a call after this step, a
  `room.left` that failed was lost: the next sweep found nothing left to tell.

  KEYS[1] HASH  presence (session id -> JSON record)
  KEYS[2] HASH  last seen (username -> ms)
  KEYS[3] STRING the session's node key
  KEYS[4] HASH  the session's memberships (`room token node` -> username)
  KEYS[5] ZSET  rooms (room -> members)
  KEYS[6] ZSET  nodes (node -> last beat, ms)
  KEYS[7] SET   the `session room` pairs told `room.left` for the dead node (keys.ts nodeToldLeft)
  KEYS[8] HASH  presence names (session id -> username; keys.ts presenceNames)
  ARGV[1] session id
  ARGV[2] the dead node
  ARGV[3] now (ms)
  ARGV[4] ARGV[5] a room's members key is ARGV[4] .. room .. ARGV[5]
  ARGV[6] a room's channel is ARGV[6] .. room
  ARGV[7] the default room (its leaves are not told); '' when there is none
  ARGV[8] the entries every `room.left` of this sweep shares (name, data, ts), packed as in a
          MessagePack map, without the map's header; ARGV[9] their number (rooms.ts RoomWire)
  ARGV[10] an event id unique to this step; each room's event id is made from it and the room
  ARGV[11] the last beat of the node the sweeper judged dead (ms; 0: it had none): a node whose
           beat is newer is alive (its id started again, presence.ts sweepPreviousLife) and
           nothing is touched
  ARGV[12] '1' to record each told `room.left` in KEYS[7] (a day): a node swept while it still
           ran tells `room.joined` for them when it writes its memberships again
           (room-restore.lua); '' for the sweep of a node's previous life, which never returns

  Returns the number of rooms the session leaves (told here), or -1 when the node beat since
  it was judged dead.
]]
local sid, node = ARGV[1], ARGV[2]
local beat = redis.call('ZSCORE', KEYS[6], node)
if beat and tonumber(beat) > tonumber(ARGV[11]) then return -1 end
local username = ''
local raw = redis.call('HGET', KEYS[1], sid)
local rec
if raw then
  rec = cjson.decode(raw)
  username = rec.username or ''
end
-- The dead node's memberships, counted by room.
local fields = redis.call('HGETALL', KEYS[4])
local theirs, counts, rooms = {}, {}, {}
for i = 1, #fields, 2 do
  local f = fields[i]
  local room, holder = string.match(f, '^(%S+) %d+ (.*)$')
  if room and holder == node then
    if username == '' then username = fields[i + 1] end
    theirs[#theirs + 1] = f
    if not counts[room] then
      counts[room] = 0
      rooms[#rooms + 1] = room
    end
    counts[room] = counts[room] + 1
  end
end
-- The rooms the session leaves, told first.
local told, scores = 0, {}
for _, room in ipairs(rooms) do
  local score = tonumber(redis.call('ZSCORE', ARGV[4] .. room .. ARGV[5], sid) or '0')
  scores[room] = score
  if score > 0 and score <= counts[room] then
    told = told + 1
    if room ~= ARGV[7] then
      local eid = string.sub(redis.sha1hex(ARGV[10] .. room), 1, 22)
      local event = string.char(0x80 + tonumber(ARGV[9]) + 4) .. ARGV[8]
        .. cmsgpack.pack('eid', eid, 'room', room, 'from', username, 'skip', sid)
      redis.call('PUBLISH', ARGV[6] .. room, event)
      if ARGV[12] == '1' then
        redis.call('SADD', KEYS[7], sid .. ' ' .. room)
        redis.call('EXPIRE', KEYS[7], 86400)
      end
    end
  end
end
-- Then what the dead node held.
if rec and rec.node == node then
  redis.call('HDEL', KEYS[1], sid)
  redis.call('HDEL', KEYS[8], sid)
  redis.call('HSET', KEYS[2], username, ARGV[3])
end
if redis.call('GET', KEYS[3]) == node then redis.call('DEL', KEYS[3]) end
if #theirs > 0 then redis.call('HDEL', KEYS[4], unpack(theirs)) end
for _, room in ipairs(rooms) do
  local key = ARGV[4] .. room .. ARGV[5]
  if scores[room] - counts[room] <= 0 then
    redis.call('ZREM', key, sid)
  else
    redis.call('ZINCRBY', key, -counts[room], sid)
  end
  local members = redis.call('ZCARD', key)
  if members > 0 then
    redis.call('ZADD', KEYS[5], members, room)
  else
    redis.call('ZREM', KEYS[5], room)
  end
end
return told
