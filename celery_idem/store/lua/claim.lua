-- claim.lua: claim an idempotency key for one attempt, or report what holds it.
-- One round trip decides everything a worker needs before running a task body.
--
-- KEYS[1]  the record, a hash: s state (P in progress, F free, C/E/X completed),
--          o owner token ('' = parked for a retry), f fence, d lease deadline (ms,
--          server clock), a arguments fingerprint, i task id, r payload, c codec
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
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 's', 'o', 'f', 'd', 'a', 'i', 'r', 'c')
local s, owner, fence = r[1], r[2], tonumber(r[3]) or 0
if s == 'P' and owner == ARGV[1] then
  -- This very attempt asked before (a client retry after a lost reply): same answer.
  return {1, fence, 0}
end
if s and s ~= 'F' and ARGV[3] ~= '' and r[5] and r[5] ~= '' and r[5] ~= ARGV[3] then
  return {4, fence, r[6] or ''}
end
if s == 'C' or s == 'E' or s == 'X' then
  return {2, fence, r[6] or '', s, r[7] or '', r[8] or ''}
end
local took_over = 0
if s == 'P' then
  local parked_for_us = owner == '' and r[6] == ARGV[2]
  local deadline = tonumber(r[4]) or 0
  if not parked_for_us then
    if deadline > now then
      return {3, fence, r[6] or '', deadline - now}
    end
    took_over = 1
  end
end
fence = fence + 1
redis.call('HSET', KEYS[1], 's', 'P', 'o', ARGV[1], 'f', fence,
           'd', now + tonumber(ARGV[4]), 'a', ARGV[3], 'i', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, fence, took_over}
