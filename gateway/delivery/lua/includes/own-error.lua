-- Included before the outbox scripts (outbox.ts): the message of an error that a session's own
-- part of a call met under pcall, when the error is that session's alone: WRONGTYPE, a key of
-- the session's name holding another type (written by something else). Any other error (an
-- ACL's NOPERM, OOM, READONLY, a bug of the script) is raised again, and the call fails as a
-- whole: a Redis error as the reply it was (a table), so that the reply keeps its code (OOM,
-- READONLY: the node knows them as outages); error() of its text would answer
-- `ERR user_script:<line>: <text>`.
local function ownError(err)
  local msg = type(err) == 'table' and tostring(err.err) or tostring(err)
  if string.find(msg, 'WRONGTYPE', 1, true) then return msg end
  if type(err) == 'table' then error(err) end
  if string.find(msg, '^%u+ ') then error({ err = msg }) end
  error(err)
end
