-- forget.lua: delete a record for an operator, unless a live attempt holds it or it
-- changed since the operator looked at it; atomic, so no claim slips in between.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  the fence the operator saw ('' = do not compare)
-- ARGV[2]  '1' = force: delete even while a live attempt or a parked retry holds the
--          key (deadline not passed), or when the key is not a celery-idem record
-- Returns {code, fence} (fence 0 when unknown), code one of
--   0  absent: nothing deleted
--   1  deleted
--   2  held by a live attempt or a parked retry, not forced: kept
--   3  its fence is not ARGV[1] any more (another attempt claimed it): kept, even forced
--   4  not a celery-idem record (another type, or undecodable), not forced: kept
local force = ARGV[2] == '1'
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
local r = nil
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then
  local ok, decoded = pcall(decode, redis.call('GET', KEYS[1]))
  if ok and decoded.f and decoded.d and decoded.r then
    r = decoded
  end
end
if not r then
  if not force then
    return {4, 0}
  end
  redis.call('DEL', KEYS[1])
  return {1, 0}
end
if ARGV[1] ~= '' and r.f ~= tonumber(ARGV[1]) then
  return {3, r.f}
end
if r.s == 'P' and r.d > now_ms() and not force then
  return {2, r.f}
end
redis.call('DEL', KEYS[1])
return {1, r.f}
