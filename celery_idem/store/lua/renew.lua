-- renew.lua: push the lease deadline of a live attempt.
--
-- KEYS[1]  the record (see claim.lua)
-- ARGV[1]  owner token of the attempt
-- ARGV[2]  lease in ms
-- ARGV[3]  least record expiry in ms (the claim's longer one is kept)
-- Returns 1 when renewed, 0 when the token no longer owns the key (taken over,
-- completed, released or expired): the caller has lost its lease.
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'd', now + tonumber(ARGV[2]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
