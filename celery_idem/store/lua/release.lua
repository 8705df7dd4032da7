-- release.lua: free the key after a failed attempt, so a retry can claim it.
-- The fence stays, so it keeps growing across attempts.
--
-- KEYS[1]  the record (see claim.lua)
-- ARGV[1]  owner token of the attempt
-- Returns 1 when released, 0 when the token does not own the key (nothing changed).
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 'o', 'd', 'a', 'i', 'r', 'c')
redis.call('HSET', KEYS[1], 's', 'F')
return 1
