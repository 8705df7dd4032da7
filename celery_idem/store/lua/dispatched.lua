-- dispatched.lua: confirm that a completed run's callbacks and chain were sent.
-- Until then a redelivery of that same message (the worker died between the
-- completion and Celery's dispatch) sends them itself; after it, it must not.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  task id of the run that completed the key
-- Returns 1 when the record is that run's completion (now marked sent), 0 otherwise
-- (absent, expired, forgotten, or completed by another task id): nothing changed.
local r = decode(redis.call('GET', KEYS[1]))
if not r or not completed(r) or r.i ~= ARGV[1] then
  return 0
end
if r.o ~= '' then
  r.o = ''
  redis.call('SET', KEYS[1], encode(r), 'KEEPTTL')
end
return 1
