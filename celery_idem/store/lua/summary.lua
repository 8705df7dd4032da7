-- summary.lua: a record without its payload, for operators' listings; writes nothing.
--
-- KEYS[1]  the record (format: record.lua)
-- Returns one of
--   {now_ms, -2}                                          absent, or a tombstone (a
--                                                         forgotten record kept only for
--                                                         its fence, see forget.lua)
--   {now_ms, pttl_ms, ''}                                 not a celery-idem record (another
--                                                         type, or a string it cannot decode)
--   {now_ms, pttl_ms, state, fence, deadline_ms, parked, task_id, codec, payload_bytes,
--    takeovers}                                           parked 1 = P with no owner
-- pttl_ms is -1 when the key never expires.
local now = now_ms()
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -2 then
  return {now, -2}
end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then
  return {now, pttl, ''}
end
local ok, r = pcall(decode, redis.call('GET', KEYS[1]))
if not ok or not r.f or not r.d or not r.r then
  return {now, pttl, ''}
end
if forgotten(r) then
  return {now, -2}
end
local parked = 0
if r.s == 'P' and r.o == '' then
  parked = 1
end
return {now, pttl, r.s, r.f, r.d, parked, r.i, r.c, #r.r, r.n}
