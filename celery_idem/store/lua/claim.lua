-- claim.lua: claim an idempotency key for one attempt, or report what holds it.
-- One round trip decides everything a worker needs before running a task body.
--
-- KEYS[1]  the record (format: record.lua)
-- ARGV[1]  owner token of this attempt (random, never '')
-- ARGV[2]  task id of this attempt
-- ARGV[3]  arguments fingerprint ('' = not checked: the key is derived from the
--          arguments, or this is a retry, which keeps the original request's)
-- ARGV[4]  lease in ms
-- ARGV[5]  record expiry in ms while in progress (ttl + lease: the fence outlives the run)
-- ARGV[6]  most takeovers allowed before the key is quarantined (0 = no cap)
-- A publisher's reservation (state R, reserve.lua) for this task id is claimed as this
-- attempt's own; one for another task id is IN_PROGRESS while it stands, and free once
-- it ran out (never a takeover: nobody ran).
-- The durable steps a record holds (record.lua) pass to the new claim: an attempt that
-- failed, parked, died or reserved left them, and this one resumes after them.
-- Returns one of
--   {1, fence, took_over, steps}                          CLAIMED (took_over 1 = the lease had
--                                                         run out; steps: the payload's
--                                                         finished steps, '' for none)
--   {2, fence, task_id, kind, payload, codec, pending}    COMPLETED (kind C result, E error,
--                                                         X no result; pending 1 = the
--                                                         completing run's callbacks and
--                                                         chain are not confirmed sent)
--   {3, fence, task_id, ms_left}                          IN_PROGRESS
--   {4, fence, task_id}                                   MISMATCH (other arguments; nothing changed)
--   {5, fence, task_id, takeovers, new}                   QUARANTINED (new 1 = this claim
--                                                         quarantined it; the body must not run)
local now = now_ms()
local r = decode(redis.call('GET', KEYS[1]))
local fence, took_over, takeovers, fingerprint = 0, 0, 0, ARGV[3]
if r then
  fence, takeovers = r.f, r.n
  if r.s == 'R' and r.i ~= ARGV[2] and r.d <= now then
    -- Reserved by a publisher for a message no worker claimed in time (its publish
    -- failed, or it is late): it holds nothing, as a free record (fence kept).
    r.s = 'F'
  end
  if r.s == 'P' and r.o == ARGV[1] then
    -- This very attempt asked before (a client retry after a lost reply): same answer.
    return {1, fence, 0, r.r}
  end
  if r.s == 'Q' then
    return {5, fence, r.i, takeovers, 0}
  end
  if (r.s ~= 'F' or r.r ~= '') and ARGV[3] ~= '' and r.a ~= '' and r.a ~= ARGV[3] then
    -- Checked before the parked retry: a new request reusing the task id with other
    -- arguments must not take the retry's place (a retry itself sends ''); nor resume
    -- the steps another request's attempt left in a free record.
    return {4, fence, r.i}
  end
  if completed(r) then
    return {2, fence, r.i, r.s, r.r, r.c, r.o == '+' and 1 or 0}
  end
  if r.s == 'R' and r.i ~= ARGV[2] then
    -- Reserved for another message, still queued: wait for it as for a running holder.
    return {3, fence, r.i, r.d - now}
  end
  if (r.s == 'R' or r.s == 'F') and fingerprint == '' and r.r ~= '' then
    -- Resuming steps under a key derived from the arguments (or a retry): they keep
    -- the fingerprint of the request that started them.
    fingerprint = r.a
  end
  if r.s == 'R' and fingerprint == '' then
    -- This message's own reservation, claimed as it is, whatever its deadline (nobody
    -- ran: no takeover); it keeps the publisher's fingerprint for the duplicates.
    fingerprint = r.a
  end
  if r.s == 'P' then
    if r.o == '' and r.i == ARGV[2] then
      -- Parked for this task id's own retry, which may carry other arguments
      -- (self.retry(args=...)): it keeps the original request's fingerprint, so
      -- duplicates of that request still match.
      fingerprint = r.a
    elseif r.d > now then
      -- Held by another attempt (or parked for another task id's retry).
      return {3, fence, r.i, r.d - now}
    else
      took_over = 1
      if fingerprint == '' then
        -- A retry (or a derived key) taking over: its first attempt's park failed or
        -- never came. The record keeps the original request's fingerprint, or a call
        -- with other arguments would be answered with this run's result.
        fingerprint = r.a
      end
      if r.o ~= '' then
        -- The owner stopped renewing: a dead or stalled worker, maybe killed by
        -- this very message. Past the cap the key is quarantined, not run.
        takeovers = takeovers + 1
        local cap = tonumber(ARGV[6])
        if cap > 0 and takeovers > cap then
          r.s, r.n, r.d, r.o = 'Q', takeovers, 0, ''
          redis.call('SET', KEYS[1], encode(r))
          return {5, fence, r.i, takeovers, 1}
        end
      end
    end
  end
end
-- The fence only grows, even across the record's expiry: it is at least the
-- server's clock in ms, and at least one more than the last claim's (so a take-over,
-- a lease later, gets the clock: thousands above the last fence, not one).
fence = math.max(fence + 1, now)
local steps = r and r.r or ''
local record = {s = 'P', f = fence, d = now + tonumber(ARGV[4]), n = takeovers, o = ARGV[1],
                a = fingerprint, i = ARGV[2], c = '', r = steps}
redis.call('SET', KEYS[1], encode(record), 'PX', ARGV[5])
return {1, fence, took_over, steps}
