-- forget.lua: forget a record for an operator, unless a live attempt holds it or it
-- changed since the operator looked at it; atomic, so no claim slips in between.
--
-- The fence must only grow, forget included, and a claim takes max(fence + 1, clock
-- in ms): deleting a record whose fence the clock has not passed yet (fences run
-- ahead of the clock when several claims come within one millisecond) would let the
-- next claim get a fence already handed out. Such a record is replaced by a
-- tombstone instead: state F with the same fence, deadline = the clock at the forget
-- (a released F has 0), takeover count 0, expiring once the clock has passed the
-- fence. Claims treat it as any free record (fence + 1); read, summary and this
-- script treat it as absent. A record whose fence is behind the clock is deleted.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  the fence the operator saw ('' = do not compare; '0' = the operator saw a
--          key that is not a record: no record has fence 0 (a reservation's neither),
--          so any record is kept)
-- ARGV[2]  '1' = force: forget even while a live attempt, a parked retry or a
--          publisher's reservation holds the key (deadline not passed), or delete a
--          key that is not a celery-idem record
-- Returns {code, fence} (fence 0 when unknown), code one of
--   0  absent (or a tombstone: already forgotten): nothing changed
--   1  forgotten: deleted, or replaced by a tombstone
--   2  held by a live attempt, a parked retry or a reservation, not forced: kept
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
if forgotten(r) then
  return {0, 0}
end
if ARGV[1] ~= '' and r.f ~= tonumber(ARGV[1]) then
  return {3, r.f}
end
local now = now_ms()
if (r.s == 'P' or r.s == 'R') and r.d > now and not force then
  return {2, r.f}
end
if r.f < now then
  redis.call('DEL', KEYS[1])
  return {1, r.f}
end
-- Until the clock has passed the fence: + 1 ms, and + 1 more because Redis 7 counts
-- a script's expiries from the moment the script started, up to a ms before TIME.
-- At most a day: a fence that far ahead was not handed out by claims (it would take
-- 86 million of them beyond the clock's pace) but forged, or the clock went back.
local px = math.min(r.f - now + 2, 86400000)
local tombstone = {s = 'F', f = r.f, d = now, n = 0, o = '', a = '', i = '', c = '', r = ''}
redis.call('SET', KEYS[1], encode(tombstone), 'PX', px)
return {1, r.f}
