-- peek.lua: what a publisher needs to know before sending a task; writes nothing.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  arguments fingerprint ('' = not checked)
-- Returns one of
--   {0}                      nothing holds the key (absent, free, a lapsed lease or
--                            reservation), or
--                            it is quarantined (the worker reports that to the caller)
--   {2, fence, task_id}      COMPLETED by task_id
--   {3, fence, task_id, ms}  IN_PROGRESS by task_id, lease left in ms (or reserved for
--                            task_id by a publisher, reservation left in ms)
--   {4, fence, task_id}      MISMATCH: the key is known with other arguments
local r = decode(redis.call('GET', KEYS[1]))
local now = now_ms()
if not r or r.s == 'F' or r.s == 'Q' or (r.s == 'R' and r.d <= now) then
  return {0}
end
if ARGV[1] ~= '' and r.a ~= '' and r.a ~= ARGV[1] then
  return {4, r.f, r.i}
end
if completed(r) then
  return {2, r.f, r.i}
end
local left = r.d - now
if left <= 0 then
  return {0}
end
return {3, r.f, r.i, left}
