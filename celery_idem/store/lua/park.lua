-- park.lua: hold the key between an attempt that called self.retry() and its retry.
-- The retried message (same task id) may claim it; a duplicate with another task id
-- still sees IN_PROGRESS until the hold runs out.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  owner token of the attempt
-- ARGV[2]  hold in ms (retry countdown + lease)
-- ARGV[3]  least record expiry in ms (the claim's longer one is kept)
-- Returns 1 when parked, 0 when the token does not own the key (nothing changed).
local r = decode(redis.call('GET', KEYS[1]))
if not r or r.s ~= 'P' or r.o ~= ARGV[1] then
  return 0
end
r.o, r.d = '', now_ms() + tonumber(ARGV[2])
redis.call('SET', KEYS[1], encode(r), 'KEEPTTL')
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
