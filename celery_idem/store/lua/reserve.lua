-- reserve.lua: what a publisher needs before sending a task, and its reservation.
-- One round trip: a key nothing holds is reserved for the task id about to be
-- published (state R), so a second send before a worker claims it finds that id.
-- The reservation is only a hint to publishers; the worker's claim still decides.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  task id the publisher will send the message under
-- ARGV[2]  arguments fingerprint ('' = not checked)
-- ARGV[3]  hold in ms: how long the reservation stands if no worker claims it
-- Returns one of
--   {0}                      not reserved, publish anyway: a lapsed lease (the claim of
--                            the message takes it over and counts it) or a quarantined
--                            key (the worker reports that to the caller)
--   {6, fence, task_id}      RESERVED for ARGV[1]: absent, free, an expired reservation,
--                            or already reserved for ARGV[1] (a client retry)
--   {2, fence, task_id}      COMPLETED by task_id
--   {3, fence, task_id, ms}  IN_PROGRESS: held by task_id (ms of lease left), or reserved
--                            for another task id (ms of reservation left)
--   {4, fence, task_id}      MISMATCH: the key is known with other arguments
local now = now_ms()
local r = decode(redis.call('GET', KEYS[1]))
if r and r.s == 'R' and r.d <= now then
  r.s = 'F'  -- a reservation that ran out holds nothing: as free (its fence is kept)
end
if r and r.s == 'Q' then
  return {0}
end
if r and r.s == 'F' and r.r ~= '' and ARGV[2] ~= '' and r.a ~= '' and r.a ~= ARGV[2] then
  -- A free record with durable steps: they belong to its request's arguments.
  return {4, r.f, r.i}
end
if r and r.s ~= 'F' then
  if ARGV[2] ~= '' and r.a ~= '' and r.a ~= ARGV[2] then
    return {4, r.f, r.i}
  end
  if completed(r) then
    return {2, r.f, r.i}
  end
  if r.s == 'R' and r.i == ARGV[1] then
    return {6, r.f, r.i}
  end
  if r.d > now then
    return {3, r.f, r.i, r.d - now}
  end
  return {0}  -- P whose lease ran out
end
-- Absent, free (a tombstone too: its fence is kept), or a reservation that ran out.
-- A reservation hands no fence out: it keeps the one it found, or on a new record the
-- clock in ms, where the next claim would start anyway (so no record has fence 0).
local fence, takeovers = now, 0
if r then
  fence, takeovers = r.f, r.n
end
local hold = tonumber(ARGV[3])
-- Durable steps a free record holds are kept for the reserved message to resume.
local steps = r and r.r or ''
local fingerprint = ARGV[2]
if fingerprint == '' and steps ~= '' then
  fingerprint = r.a
end
local record = {s = 'R', f = fence, d = now + hold, n = takeovers, o = '', a = fingerprint,
                i = ARGV[1], c = '', r = steps}
redis.call('SET', KEYS[1], encode(record), 'KEEPTTL')
if redis.call('PTTL', KEYS[1]) < hold then
  redis.call('PEXPIRE', KEYS[1], hold)
end
return {6, fence, ARGV[1]}
