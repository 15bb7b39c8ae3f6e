--[[
  Publishes a room event to every node subscribed to the room's channel and, when the room
  keeps history, adds it to the room's recent messages, trimmed by age and count. Run in the
  session binding's one script call per tick (gateway/binding.ts), so the room events of one
  tick, from every connection, cost one round trip.

  KEYS[1] ZSET  the room's recent messages (score: ms); no key when the event is not kept
  ARGV[1] the room's channel
  ARGV[2] the room event, packed (rooms.ts RoomWire): the same bytes go to the channel and the
          history
  When kept:
  ARGV[3] its time (ms), the score
  ARGV[4] messages at or before this score are dropped (the event's time minus the history span)
  ARGV[5] the rank from the end below which messages are dropped (-(most kept + 1))
  ARGV[6] the history's time to live (ms)
]]
redis.call('PUBLISH', ARGV[1], ARGV[2])
if KEYS[1] then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
  redis.call('ZREMRANGEBYRANK', KEYS[1], '0', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
return 0
