-- record.lua: the record format, prepended to every other script (not run alone).
--
-- One Redis STRING per key, so a completed record with a 100-byte result takes 264 to
-- 280 bytes of MEMORY USAGE (tests/integration/test_round_trips.py; a hash would turn
-- into a hashtable once a value passes hash-max-listpack-value, 64 bytes by default,
-- and double that):
--
--   <state><fence>:<deadline>:<takeovers>:<len>:<owner><len>:<fingerprint><len>:<task id><len>:<codec><payload>
--
--   state        one byte: P in progress, F free (released), C/E/X completed
--                (result, cached error, no result kept), Q quarantined, R reserved by
--                a publisher for the message it is sending (reserve.lua; the worker
--                that gets that task id claims it as its own)
--   fence        max(last fence + 1, server clock in ms) at every claim (claim.lua), so
--                it only grows (a reservation hands none out: it keeps the one it
--                found, or the clock in ms on a new record; never 0); survives a
--                release, and a forget until
--                the server's clock has passed it (a tombstone, see forget.lua)
--   deadline     lease deadline in ms on the server's clock (P); the end of the
--                reservation (R: after it the record holds nothing); in an F record 0
--                after a release, or the server's clock in ms at the forget that
--                left it as a tombstone (see forget.lua); in C/E/X the number of
--                durable steps the completing run stored (complete.lua); 0 in any
--                other state
--   takeovers    how many times a claim took the key from an attempt that stopped
--                renewing (a dead or stalled worker) since the record was created;
--                kept across release and parking, so a poison message that kills
--                every worker it reaches is counted (claim.lua quarantines past the cap)
--   owner        P: token of the owning attempt ('' while parked for a retry); R: '';
--                C/E/X: '+' while the completing run's callbacks and chain are not
--                yet confirmed sent (dispatched.lua clears it), else ''
--   fingerprint  arguments fingerprint ('' = not checked); R: the publisher's
--   task id      the owner's, the completing run's, or (R) the reserved message's Celery
--                task id
--   codec        how the payload is serialized (see celery_idem/codec.py)
--   payload      everything after the codec, bytes as they are (no escaping): in a
--                completed record the result (or the cached error, or why there is
--                none); in P, F, R and Q the run's finished durable steps (below), ''
--                when there are none
--
-- Durable steps (``self.step``, step.lua) live in the payload of a record that is not
-- completed, so they survive what does not complete the key (a release, a park, a
-- takeover, a reservation; claim.lua hands them to the next attempt in its reply):
--
--   <count>:<step>...
--   step         <len>:<name><occurrence>:<at>:<len>:<codec><len>:<value>
--                name and occurrence (the n-th step of that name in the run, from 1);
--                at: the server's clock in ms when it was stored; codec and value as a
--                result's (celery_idem/codec.py); codec '' = the step ran but its value
--                could not be kept, and value says why
--
-- A step adds its name and value plus 24 to 26 bytes (a one-letter codec, a name under
-- 10 bytes, a one-digit occurrence, a value of 10 to 9999 bytes), and the count adds 2
-- or 3 once; MEMORY USAGE grows with the string, rounded to the allocator's size
-- classes (jemalloc: up to about a fifth more for 1000-byte values; libc: 16 bytes).
-- tests/integration/test_step_memory.py measures it against docs/durable-steps.md.
--
-- A completion drops them and keeps their count in the deadline field (above); a
-- forget drops them with the record. While steps stand, an F record keeps its
-- fingerprint, so a request with other arguments cannot resume them (MISMATCH).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function read_number(v, pos)
  local colon = string.find(v, ':', pos, true)
  return tonumber(string.sub(v, pos, colon - 1)), colon + 1
end

local function read_field(v, pos)
  local n, start = read_number(v, pos)
  return string.sub(v, start, start + n - 1), start + n
end

local function decode(v)
  if not v then
    return nil
  end
  local r, pos = {s = string.sub(v, 1, 1)}, 2
  r.f, pos = read_number(v, pos)
  r.d, pos = read_number(v, pos)
  r.n, pos = read_number(v, pos)
  r.o, pos = read_field(v, pos)
  r.a, pos = read_field(v, pos)
  r.i, pos = read_field(v, pos)
  r.c, pos = read_field(v, pos)
  r.r = string.sub(v, pos)
  return r
end

local function encode(r)
  return r.s .. string.format('%d', r.f) .. ':' .. string.format('%d', r.d) .. ':'
    .. string.format('%d', r.n) .. ':'
    .. #r.o .. ':' .. r.o .. #r.a .. ':' .. r.a .. #r.i .. ':' .. r.i
    .. #r.c .. ':' .. r.c .. r.r
end

local function completed(r)
  return r.s == 'C' or r.s == 'E' or r.s == 'X'
end

-- A tombstone: what forget.lua leaves of a record whose fence the server's clock has
-- not passed yet. Free for any claim (fence + 1); absent to operators' reads.
local function forgotten(r)
  return r.s == 'F' and r.d > 0
end


-- How many durable steps a record that is not completed holds (see the payload above).
local function step_count(r)
  if r.r == '' then
    return 0
  end
  return read_number(r.r, 1)
end
