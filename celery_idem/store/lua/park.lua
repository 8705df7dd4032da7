-- park.lua: hold the key between an attempt that called self.retry() and its retry.
-- The retried message (same task id) may claim it; a duplicate with another task id
-- still sees IN_PROGRESS until the hold runs out.
--
-- KEYS[1]  the record (see claim.lua)
-- ARGV[1]  owner token of the attempt
-- ARGV[2]  hold in ms (retry countdown + lease)
-- ARGV[3]  least record expiry in ms (the claim's longer one is kept)
-- Returns 1 when parked, 0 when the token does not own the key (nothing changed).
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'o', '', 'd', now + tonumber(ARGV[2]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
