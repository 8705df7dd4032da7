-- complete.lua: store the outcome of the attempt that owns the key (fenced).
--
-- KEYS[1]  the record (see claim.lua)
-- ARGV[1]  owner token of the attempt
-- ARGV[2]  fence of the attempt
-- ARGV[3]  kind: C (result), E (cached error), X (no result kept)
-- ARGV[4]  payload (serialized result, error, or the reason there is none)
-- ARGV[5]  codec tag of the payload
-- ARGV[6]  retention in ms
-- Returns 1 when stored (or already stored by this same attempt: a client retry
-- after a lost reply), 0 when another attempt owns the key now: nothing is written.
local r = redis.call('HMGET', KEYS[1], 's', 'o', 'f')
if r[2] ~= ARGV[1] then
  if (r[1] == 'C' or r[1] == 'E' or r[1] == 'X') and r[3] == ARGV[2] then
    return 1
  end
  return 0
end
redis.call('HDEL', KEYS[1], 'o', 'd')
redis.call('HSET', KEYS[1], 's', ARGV[3], 'r', ARGV[4], 'c', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
