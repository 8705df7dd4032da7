-- claim.lua: claim an idempotency key for one attempt, or report what holds it.
-- One round trip decides everything a worker needs before running a task body.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  owner token of this attempt (random, never '')
-- ARGV[2]  task id of this attempt
-- ARGV[3]  arguments fingerprint ('' = not checked, the key is derived from them)
-- ARGV[4]  lease in ms
-- ARGV[5]  record expiry in ms while in progress (ttl + lease: the fence outlives the run)
-- Returns one of
--   {1, fence, took_over}                        CLAIMED (took_over 1 = the lease had run out)
--   {2, fence, task_id, kind, payload, codec}    COMPLETED (kind C result, E error, X no result)
--   {3, fence, task_id, ms_left}                 IN_PROGRESS
--   {4, fence, task_id}                          MISMATCH (other arguments; nothing changed)
local now = now_ms()
local r = decode(redis.call('GET', KEYS[1]))
local fence, took_over, parked_for_us = 0, 0, false
if r then
  fence = r.f
  if r.s == 'P' and r.o == ARGV[1] then
    -- This very attempt asked before (a client retry after a lost reply): same answer.
    return {1, fence, 0}
  end
  -- Parked for this task id's own retry: it may come back with other arguments
  -- (self.retry(args=...)), so this is checked before the fingerprint.
  parked_for_us = r.s == 'P' and r.o == '' and r.i == ARGV[2]
  if not parked_for_us then
    if r.s ~= 'F' and ARGV[3] ~= '' and r.a ~= '' and r.a ~= ARGV[3] then
      return {4, fence, r.i}
    end
    if completed(r) then
      return {2, fence, r.i, r.s, r.r, r.c}
    end
    if r.s == 'P' then
      -- Held by another attempt (or parked for another task id's retry).
      if r.d > now then
        return {3, fence, r.i, r.d - now}
      end
      took_over = 1
    end
  end
end
-- The fence only grows, even across the record's expiry: it is at least the
-- server's clock in ms, and one more than the last claim's.
fence = math.max(fence + 1, now)
-- A parked retry keeps the original request's fingerprint: duplicates of that request
-- must still match, whatever arguments the retry carries.
local fingerprint = ARGV[3]
if parked_for_us then
  fingerprint = r.a
end
local record = {s = 'P', f = fence, d = now + tonumber(ARGV[4]), o = ARGV[1], a = fingerprint,
                i = ARGV[2], c = '', r = ''}
redis.call('SET', KEYS[1], encode(record), 'PX', ARGV[5])
return {1, fence, took_over}
