-- release.lua: free the key after a failed attempt, so a retry can claim it.
-- The fence stays, so it keeps growing across attempts, and so does the takeover
-- count (a poison message may fail normally between the kills it causes). Finished
-- durable steps stay too, with the fingerprint and task id of the request that ran
-- them: the next attempt of that request resumes after them, another request's is
-- refused (MISMATCH, claim.lua).
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  owner token of the attempt
-- Returns 1 when released, 0 when the token does not own the key (nothing changed).
local r = decode(redis.call('GET', KEYS[1]))
if not r or r.s ~= 'P' or r.o ~= ARGV[1] then
  return 0
end
local free = {s = 'F', f = r.f, d = 0, n = r.n, o = '', a = '', i = '', c = '', r = r.r}
if r.r ~= '' then
  free.a, free.i = r.a, r.i
end
redis.call('SET', KEYS[1], encode(free), 'KEEPTTL')
return 1
