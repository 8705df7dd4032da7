-- renew.lua: push the lease deadline of a live attempt.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  owner token of the attempt
-- ARGV[2]  lease in ms (the deadline never moves back: a renewal still in flight
--          when the run handed its key over to a replacement must not shorten it)
-- ARGV[3]  least record expiry in ms (the claim's longer one is kept)
-- Returns 1 when renewed, 0 when the token no longer owns the key (taken over,
-- completed, released or expired): the caller has lost its lease.
local r = decode(redis.call('GET', KEYS[1]))
if not r or r.s ~= 'P' or r.o ~= ARGV[1] then
  return 0
end
r.d = math.max(r.d, now_ms() + tonumber(ARGV[2]))
redis.call('SET', KEYS[1], encode(r), 'KEEPTTL')
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
