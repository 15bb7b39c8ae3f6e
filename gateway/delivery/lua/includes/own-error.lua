-- Included before the outbox scripts (outbox.ts): the message of an error that a session's own
-- part of a call met under pcall, when the error is that session's alone: WRONGTYPE, a key of
-- the session's name holding another type (written by something else). Any other error (an
-- ACL's NOPERM, OOM, a bug of the script) is raised again, and the call fails as a whole.
local function ownError(err)
  local msg = type(err) == 'table' and tostring(err.err) or tostring(err)
  if string.find(msg, 'WRONGTYPE', 1, true) then return msg end
  error(err)
end
