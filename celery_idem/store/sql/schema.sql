-- schema.sql: celery-idem's records in PostgreSQL, one row per key, one function per
-- transition. The same semantics as the Redis scripts (store/lua/*.lua, whose
-- record.lua documents the record); this header is the row's format, each function
-- opens with its own contract (arguments, returns, what it does).
--
-- Applied by `celery -A proj idem migrate` (celery_idem.store.postgres_admin.migrate) or
-- by the Django app's migration (RunSQL): every statement is idempotent (IF NOT EXISTS,
-- CREATE OR REPLACE), so applying the file twice is harmless. Each statement ends at a
-- line holding only `-- ;;` (function bodies hold semicolons; this header is the first,
-- comment-only chunk, which the splitter drops); there is no psql meta-command and no
-- percent sign, so any driver can run each statement as it is.
--
-- Every transition is ONE statement (`SELECT * FROM celery_idem_claim(...)`) in its own
-- short transaction: one round trip. A writer locks the key's row (SELECT ... FOR
-- UPDATE) before it decides, which is what Redis' one-script-at-a-time gives the Lua
-- scripts; three helpers below do that for every writer, inside the same statement
-- (celery_idem_row for claim and reserve, celery_idem_live for any live row,
-- celery_idem_owned for a row one attempt owns). A key with no row yet is claimed or
-- reserved by INSERT ... ON CONFLICT DO NOTHING: of two concurrent first claims one
-- inserts, the other waits for it to commit, then locks the row it inserted and decides
-- on it (IN_PROGRESS).
--
-- Time is the server's clock (clock_timestamp(), read after the row lock is taken, so a
-- claim that waited for a lock measures from when it got it), never the workers': the
-- lease, the reservation, the parked hold and the expiry are timestamptz on that clock,
-- and durations arrive in milliseconds.
--
-- celery_idem_records, one row per storage key:
--
--   key          the storage key (COLLATE "C": byte order, so a prefix is one range of
--                the primary key, which celery idem's SCAN-like listing walks)
--   state        one letter (celery_idem/store/record.py, RecordState): P in progress
--                (or parked), F free (released; or a forgotten record's tombstone),
--                C/E/X completed (result, cached error, no result kept), Q quarantined,
--                R reserved by a publisher for the message it is sending
--   fence        max(last fence + 1, server clock in ms) at every claim, so it only
--                grows (an expired row keeps it until the next claim rewrites the row;
--                purge deletes a row only once the clock has passed its fence, and a
--                forget of a row whose fence is ahead of the clock leaves a tombstone);
--                a reservation hands none out (it keeps the one it found, or the clock
--                in ms on a new row: never 0)
--   deadline     P: lease deadline, or the end of a parked hold; R: the end of the
--                reservation (after it the row holds nothing); F: NULL after a release,
--                the time of the forget in a tombstone; NULL in any other state
--   takeovers    claims that took the key from an attempt that stopped renewing, kept
--                across release and parking (claim quarantines past the cap)
--   owner        P: the owning attempt's token ('' while parked for a retry); else ''
--   pending      C/E/X: the completing run's callbacks and chain are not confirmed sent
--                yet (celery_idem_dispatched clears it)
--   fingerprint  arguments fingerprint ('' = not checked); R: the publisher's
--   task_id      the owner's, the completing run's, or (R) the reserved message's
--   codec        C/E/X: how the payload is serialized (celery_idem/codec.py)
--   payload      C/E/X: the result, the cached error, or why there is none; else ''
--   steps        the finished durable steps of a record that is not completed, in
--                record.lua's format ('<count>:<step>...', see there and
--                celery_idem/store/record.py decode_steps), '' when there are none; a
--                completion drops them
--   step_count   not completed: how many steps `steps` holds; C/E/X: how many the
--                completing run stored
--   expires_at   when the row stops counting (it is then as absent to every function
--                and the next claim reuses it; purge deletes it); NULL = never (Q)
--
-- payload and steps are kept as given (STORAGE EXTERNAL: no compression on the hot path,
-- as Redis keeps them); their size is what the serializer made it.
--
-- celery_idem_schema holds the schema's version in its one row (SCHEMA_VERSION in
-- celery_idem/store/postgres_admin.py); the stores refuse a database whose version is
-- older. A future version that changes a function's OUT columns must DROP it first
-- (CREATE OR REPLACE cannot change a function's result type).
-- ;;
CREATE TABLE IF NOT EXISTS celery_idem_records (
    key text COLLATE "C" PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('P', 'F', 'C', 'E', 'X', 'Q', 'R')),
    fence bigint NOT NULL,
    deadline timestamptz,
    takeovers integer NOT NULL DEFAULT 0,
    owner text NOT NULL DEFAULT '',
    pending boolean NOT NULL DEFAULT false,
    fingerprint text NOT NULL DEFAULT '',
    task_id text NOT NULL DEFAULT '',
    codec text NOT NULL DEFAULT '',
    payload bytea NOT NULL DEFAULT '',
    steps bytea NOT NULL DEFAULT '',
    step_count integer NOT NULL DEFAULT 0,
    expires_at timestamptz
)
-- ;;
ALTER TABLE celery_idem_records ALTER COLUMN payload SET STORAGE EXTERNAL,
    ALTER COLUMN steps SET STORAGE EXTERNAL
-- ;;
-- What purge walks: the rows whose expiry passed.
CREATE INDEX IF NOT EXISTS celery_idem_records_expires_at ON celery_idem_records (expires_at)
-- ;;
CREATE TABLE IF NOT EXISTS celery_idem_schema (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
-- ;;
-- celery_idem_ms(at): `at` in ms since the epoch, floored (what Redis' TIME gives).
CREATE OR REPLACE FUNCTION celery_idem_ms(p_at timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT floor(extract(epoch FROM p_at) * 1000)::bigint
$$
-- ;;
-- celery_idem_after(at, ms): `ms` milliseconds after `at`.
CREATE OR REPLACE FUNCTION celery_idem_after(p_at timestamptz, p_ms bigint) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT p_at + p_ms * interval '1 millisecond'
$$
-- ;;
-- celery_idem_row: lock the key's row for claim or reserve, inserting it when there is
-- none (the only writers that create rows). Of two concurrent first writers one inserts,
-- the other waits for it to commit, then locks the row it inserted; a row deleted between
-- (purge, forget) is tried again, three times at most.
--
-- p_key             the storage key
-- p_state, p_owner, p_fingerprint, p_task_id   the new row's, when there is none
-- p_deadline_ms     the new row's deadline from now (lease, or reservation hold)
-- p_expire_ms       the new row's expiry from now
-- p_caller          the transition's name, for the error
-- Returns (rec, clock, inserted): rec the locked row, expired or not (an expired row is
-- as absent but keeps its fence), or the new one (its fence the clock in ms); clock the
-- server's, read after the lock; inserted when the row is new (the caller returns at
-- once). Raises SQLSTATE 40001 when the row keeps vanishing.
CREATE OR REPLACE FUNCTION celery_idem_row(
    p_key text, p_state text, p_owner text, p_fingerprint text, p_task_id text,
    p_deadline_ms bigint, p_expire_ms bigint, p_caller text,
    OUT rec celery_idem_records, OUT clock timestamptz, OUT inserted boolean)
LANGUAGE plpgsql AS $$
BEGIN
    inserted := false;
    FOR attempt IN 1..3 LOOP
        SELECT * INTO rec FROM celery_idem_records WHERE key = p_key FOR UPDATE;
        clock := clock_timestamp();
        EXIT WHEN FOUND;
        IF attempt = 3 THEN
            RAISE EXCEPTION USING ERRCODE = '40001',
                MESSAGE = p_caller || ': the row of ' || p_key || ' keeps vanishing';
        END IF;
        INSERT INTO celery_idem_records
            (key, state, fence, deadline, owner, fingerprint, task_id, expires_at)
        VALUES (p_key, p_state, celery_idem_ms(clock), celery_idem_after(clock, p_deadline_ms),
                p_owner, p_fingerprint, p_task_id, celery_idem_after(clock, p_expire_ms))
        ON CONFLICT (key) DO NOTHING
        RETURNING * INTO rec;
        IF FOUND THEN
            inserted := true;
            RETURN;
        END IF;
    END LOOP;
END
$$
-- ;;
-- celery_idem_live: lock the key's row for a writer that changes only a live record.
--
-- p_key   the storage key
-- Returns (rec, clock): rec the locked row, or NULL when there is none or it has expired
-- (as absent to every function); clock the server's, read after the lock, so a writer
-- that waited for it measures from when it got it. The lock holds until the caller's
-- transaction ends.
CREATE OR REPLACE FUNCTION celery_idem_live(
    p_key text, OUT rec celery_idem_records, OUT clock timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT * INTO rec FROM celery_idem_records WHERE key = p_key FOR UPDATE;
    clock := clock_timestamp();
    IF NOT FOUND OR rec.expires_at <= clock THEN
        rec := NULL;
    END IF;
END
$$
-- ;;
-- celery_idem_owned: celery_idem_live for the transitions only the owning attempt may
-- make (renew, release, step, park): the token check of every *.lua script but claim's.
--
-- p_key, p_token   the record and the attempt's owner token
-- Returns (rec, clock) as celery_idem_live, rec NULL also when the row is not in
-- progress under p_token (taken over, parked, completed, released).
CREATE OR REPLACE FUNCTION celery_idem_owned(
    p_key text, p_token text, OUT rec celery_idem_records, OUT clock timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    o record;
BEGIN
    o := celery_idem_live(p_key);
    rec := o.rec; clock := o.clock;
    IF rec.state <> 'P' OR rec.owner <> p_token THEN
        rec := NULL;
    END IF;
END
$$
-- ;;
-- celery_idem_claim: claim a key for one attempt, or report what holds it (claim.lua).
--
-- p_key            the storage key
-- p_token          owner token of this attempt (random, never '')
-- p_task_id        task id of this attempt
-- p_fingerprint    arguments fingerprint ('' = not checked: a key derived from the
--                  arguments, or a retry, which keeps the original request's)
-- p_lease_ms       lease
-- p_expire_ms      row expiry while in progress (ttl + lease: the fence outlives the run)
-- p_max_takeovers  most takeovers allowed before the key is quarantined (0 = no cap)
-- A publisher's reservation (R) for this task id is claimed as this attempt's own; one
-- for another task id is IN_PROGRESS while it stands, free once it ran out (never a
-- takeover: nobody ran). The durable steps the row holds pass to the new claim.
-- Returns one row (code, fence, task_id, took_over, ms_left, kind, payload, codec,
-- pending, takeovers, quarantined_now, steps); by code (ClaimState):
--   1 CLAIMED      fence (new), took_over (the lease had run out), steps (finished
--                  durable steps, '' for none)
--   2 COMPLETED    fence, task_id, kind (C/E/X), payload, codec, pending (the completing
--                  run's callbacks and chain are not confirmed sent)
--   3 IN_PROGRESS  fence, task_id, ms_left (of the lease, or of another message's
--                  reservation)
--   4 MISMATCH     fence, task_id (other arguments; nothing changed)
--   5 QUARANTINED  fence, task_id, takeovers, quarantined_now (this claim quarantined it)
CREATE OR REPLACE FUNCTION celery_idem_claim(
    p_key text, p_token text, p_task_id text, p_fingerprint text,
    p_lease_ms bigint, p_expire_ms bigint, p_max_takeovers integer,
    OUT code integer, OUT fence bigint, OUT task_id text, OUT took_over boolean,
    OUT ms_left bigint, OUT kind text, OUT payload bytea, OUT codec text,
    OUT pending boolean, OUT takeovers integer, OUT quarantined_now boolean,
    OUT steps bytea)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
    v_now_ms bigint;
    v_state text;
    v_fence bigint := 0;
    v_takeovers integer := 0;
    v_steps bytea := '';
    v_step_count integer := 0;
    v_fingerprint text := p_fingerprint;
BEGIN
    code := 1; task_id := p_task_id; took_over := false; ms_left := 0; kind := '';
    payload := ''; codec := ''; pending := false; takeovers := 0; quarantined_now := false;
    steps := '';
    -- The answers that change nothing are read without the row lock: a completed or
    -- quarantined row, or one held by another live attempt. Locked, a duplicate's claim
    -- would take a transaction id and its commit would wait for a WAL flush (an fsync
    -- per duplicate, and per poll of a waiting one); read, it writes nothing. A
    -- transaction completing the row meanwhile is not waited for: the duplicate sees
    -- the row as it was (in progress) and looks again later, as it would have a moment
    -- earlier.
    v_now := clock_timestamp();
    SELECT * INTO r FROM celery_idem_records WHERE key = p_key;
    IF FOUND AND (r.expires_at IS NULL OR r.expires_at > v_now) AND (
            r.state IN ('C', 'E', 'X', 'Q')
            OR (r.state = 'P' AND r.owner NOT IN ('', p_token) AND r.deadline > v_now)) THEN
        task_id := r.task_id; fence := r.fence;
        IF r.state = 'Q' THEN
            code := 5; takeovers := r.takeovers;
        ELSIF p_fingerprint <> '' AND r.fingerprint <> ''
                AND r.fingerprint <> p_fingerprint THEN
            code := 4;
        ELSIF r.state = 'P' THEN
            code := 3; ms_left := celery_idem_ms(r.deadline) - celery_idem_ms(v_now);
        ELSE
            code := 2; kind := r.state; payload := r.payload; codec := r.codec;
            pending := r.pending;
        END IF;
        RETURN;
    END IF;
    o := celery_idem_row(p_key, 'P', p_token, p_fingerprint, p_task_id, p_lease_ms,
                         p_expire_ms, 'celery_idem_claim');
    r := o.rec; v_now := o.clock; v_now_ms := celery_idem_ms(v_now);
    IF o.inserted THEN
        fence := r.fence;  -- no row: this claim inserted it
        RETURN;
    END IF;
    v_fence := r.fence;  -- kept even from an expired row: the fence only grows
    IF r.expires_at IS NULL OR r.expires_at > v_now THEN
        v_takeovers := r.takeovers;
        v_steps := r.steps;
        v_step_count := r.step_count;
        v_state := r.state;
        IF v_state = 'R' AND r.task_id <> p_task_id AND r.deadline <= v_now THEN
            -- Reserved for a message no worker claimed in time: holds nothing.
            v_state := 'F';
        END IF;
        IF v_state = 'P' AND r.owner = p_token THEN
            -- This very attempt asked before (a retry after a lost reply): same answer.
            fence := v_fence; steps := v_steps;
            RETURN;
        END IF;
        task_id := r.task_id;
        fence := v_fence;
        IF v_state = 'Q' THEN
            code := 5; takeovers := v_takeovers;
            RETURN;
        END IF;
        IF (v_state <> 'F' OR r.steps <> '') AND p_fingerprint <> ''
                AND r.fingerprint <> '' AND r.fingerprint <> p_fingerprint THEN
            -- Checked before the parked retry: a new request reusing the task id with
            -- other arguments must not take the retry's place, nor resume the steps
            -- another request's attempt left in a free row.
            code := 4;
            RETURN;
        END IF;
        IF v_state IN ('C', 'E', 'X') THEN
            code := 2; kind := v_state; payload := r.payload; codec := r.codec;
            pending := r.pending;
            RETURN;
        END IF;
        IF v_state = 'R' AND r.task_id <> p_task_id THEN
            -- Reserved for another message, still queued: wait as for a running holder.
            code := 3; ms_left := celery_idem_ms(r.deadline) - v_now_ms;
            RETURN;
        END IF;
        IF v_state IN ('R', 'F') AND v_fingerprint = '' AND r.steps <> '' THEN
            v_fingerprint := r.fingerprint;  -- resumed steps keep their request's
        END IF;
        IF v_state = 'R' AND v_fingerprint = '' THEN
            v_fingerprint := r.fingerprint;  -- its own reservation, claimed as it is
        END IF;
        IF v_state = 'P' THEN
            IF r.owner = '' AND r.task_id = p_task_id THEN
                -- Parked for this task id's own retry (which may change its arguments):
                -- it keeps the original request's fingerprint.
                v_fingerprint := r.fingerprint;
            ELSIF r.deadline > v_now THEN
                code := 3; ms_left := celery_idem_ms(r.deadline) - v_now_ms;
                RETURN;
            ELSE
                took_over := true;
                IF v_fingerprint = '' THEN
                    -- A retry (or a derived key) taking over: its first attempt's park
                    -- failed or never came. The row keeps the original request's
                    -- fingerprint, or a call with other arguments would be answered
                    -- with this run's result.
                    v_fingerprint := r.fingerprint;
                END IF;
                IF r.owner <> '' THEN
                    -- The owner stopped renewing (a dead or stalled worker, maybe killed
                    -- by this very message): past the cap the key is quarantined.
                    v_takeovers := v_takeovers + 1;
                    IF p_max_takeovers > 0 AND v_takeovers > p_max_takeovers THEN
                        UPDATE celery_idem_records
                        SET state = 'Q', takeovers = v_takeovers, deadline = NULL,
                            owner = '', expires_at = NULL
                        WHERE key = p_key;
                        code := 5; takeovers := v_takeovers; quarantined_now := true;
                        took_over := false;
                        RETURN;
                    END IF;
                END IF;
            END IF;
        END IF;
    END IF;
    v_fence := greatest(v_fence + 1, v_now_ms);
    UPDATE celery_idem_records
    SET state = 'P', fence = v_fence, deadline = celery_idem_after(v_now, p_lease_ms),
        takeovers = v_takeovers, owner = p_token, pending = false,
        fingerprint = v_fingerprint, task_id = p_task_id, codec = '', payload = '',
        steps = v_steps, step_count = v_step_count,
        expires_at = celery_idem_after(v_now, p_expire_ms)
    WHERE key = p_key;
    code := 1; fence := v_fence; task_id := p_task_id; steps := v_steps;
END
$$
-- ;;
-- celery_idem_renew: push the lease deadline of a live attempt (renew.lua).
--
-- p_key, p_token   the record and the owning attempt's token
-- p_lease_ms       lease (the deadline never moves back: a renewal still in flight when
--                  the run handed its key over must not shorten the longer one)
-- p_least_ms       least row expiry from now (the claim's longer one is kept)
-- Returns true when renewed, false when the token no longer owns the key (taken over,
-- completed, released or expired): the caller has lost its lease.
CREATE OR REPLACE FUNCTION celery_idem_renew(
    p_key text, p_token text, p_lease_ms bigint, p_least_ms bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
BEGIN
    o := celery_idem_owned(p_key, p_token);
    r := o.rec; v_now := o.clock;
    IF r IS NULL THEN
        RETURN false;
    END IF;
    UPDATE celery_idem_records
    SET deadline = greatest(r.deadline, celery_idem_after(v_now, p_lease_ms)),
        expires_at = greatest(r.expires_at, celery_idem_after(v_now, p_least_ms))
    WHERE key = p_key;
    RETURN true;
END
$$
-- ;;
-- celery_idem_complete: store the outcome of the attempt that owns the key (complete.lua).
-- Also what PostgresStore.completion_statement runs inside a caller's transaction: the
-- row stays locked until that transaction ends.
--
-- p_key, p_token   the record and the owning attempt's token
-- p_fence          the attempt's fence
-- p_kind           C (result), E (cached error), X (no result kept)
-- p_payload        the serialized result, error, or why there is none
-- p_codec          its codec tag
-- p_ttl_ms         retention
-- p_task_id        the attempt's task id
-- p_continuation   the attempt still has callbacks or a chain to send
-- The durable steps are dropped; their count stays (step_count).
-- Returns true when stored (or already stored by this same attempt: a retry after a
-- lost reply finds its own fence and task id), false when another attempt owns the key:
-- nothing is written.
CREATE OR REPLACE FUNCTION celery_idem_complete(
    p_key text, p_token text, p_fence bigint, p_kind text, p_payload bytea, p_codec text,
    p_ttl_ms bigint, p_task_id text, p_continuation boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
BEGIN
    IF p_kind NOT IN ('C', 'E', 'X') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'celery_idem_complete: kind must be C, E or X, not ' || p_kind;
    END IF;
    o := celery_idem_live(p_key);
    r := o.rec; v_now := o.clock;
    IF r IS NULL THEN
        RETURN false;
    END IF;
    IF r.state <> 'P' OR r.owner <> p_token THEN
        RETURN r.state IN ('C', 'E', 'X') AND r.fence = p_fence AND r.task_id = p_task_id;
    END IF;
    UPDATE celery_idem_records
    SET state = p_kind, deadline = NULL, owner = '', pending = p_continuation,
        codec = p_codec, payload = p_payload, steps = '',
        expires_at = celery_idem_after(v_now, p_ttl_ms)
    WHERE key = p_key;
    RETURN true;
END
$$
-- ;;
-- celery_idem_dispatched: confirm that a completed run's callbacks and chain were sent
-- (dispatched.lua). Until then a redelivery of that message sends them itself.
--
-- p_key, p_task_id   the record and the task id of the run that completed it
-- Returns true when the row is that run's completion (now marked sent), false otherwise
-- (absent, expired, forgotten, or completed by another task id): nothing changed.
CREATE OR REPLACE FUNCTION celery_idem_dispatched(p_key text, p_task_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r celery_idem_records;
BEGIN
    r := (celery_idem_live(p_key)).rec;
    IF r IS NULL OR r.state NOT IN ('C', 'E', 'X') OR r.task_id <> p_task_id THEN
        RETURN false;
    END IF;
    IF r.pending THEN
        UPDATE celery_idem_records SET pending = false WHERE key = p_key;
    END IF;
    RETURN true;
END
$$
-- ;;
-- celery_idem_release: free the key after a failed attempt (release.lua). The fence and
-- the takeover count stay; so do the durable steps, with the fingerprint and task id of
-- the request that ran them (another request's claim is then a MISMATCH).
--
-- p_key, p_token   the record and the owning attempt's token
-- Returns true when released, false when the token does not own the key (nothing changed).
CREATE OR REPLACE FUNCTION celery_idem_release(p_key text, p_token text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r celery_idem_records;
BEGIN
    r := (celery_idem_owned(p_key, p_token)).rec;
    IF r IS NULL THEN
        RETURN false;
    END IF;
    UPDATE celery_idem_records
    SET state = 'F', deadline = NULL, owner = '', pending = false, codec = '',
        payload = '',
        fingerprint = CASE WHEN r.steps <> '' THEN r.fingerprint ELSE '' END,
        task_id = CASE WHEN r.steps <> '' THEN r.task_id ELSE '' END
    WHERE key = p_key;
    RETURN true;
END
$$
-- ;;
-- celery_idem_step: append one finished durable step of the attempt that owns the key
-- (step.lua), so a later attempt gets it back in its claim and does not run it again.
-- Also what PostgresStore.step_statement runs inside a caller's transaction.
--
-- p_key, p_token   the record and the owning attempt's token
-- p_position       the step's place in the run, from 1 (replayed steps count too)
-- p_name           its name
-- p_occurrence     the n-th step of that name in the run, from 1
-- p_codec          codec tag of the value ('' = not kept; the value says why)
-- p_value          the value, serialized
-- Returns true when stored (or already stored: a retry after a lost reply), false when
-- the token no longer owns the key (nothing written). Raises SQLSTATE IDM01 when the row
-- holds fewer steps than the position follows (a step of this attempt was never stored).
CREATE OR REPLACE FUNCTION celery_idem_step(
    p_key text, p_token text, p_position integer, p_name text, p_occurrence integer,
    p_codec text, p_value bytea) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
    v_entry bytea;
    v_steps bytea;
BEGIN
    o := celery_idem_owned(p_key, p_token);
    r := o.rec; v_now := o.clock;
    IF r IS NULL THEN
        RETURN false;
    END IF;
    IF p_position <= r.step_count THEN
        RETURN true;
    END IF;
    IF p_position <> r.step_count + 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'IDM01',
            MESSAGE = 'record ' || p_key || ' holds ' || r.step_count
                || ' durable steps, fewer than step ' || p_name || ' (position '
                || p_position || ') follows; nothing was written';
    END IF;
    v_entry := convert_to(
        octet_length(convert_to(p_name, 'UTF8')) || ':' || p_name || p_occurrence || ':'
        || celery_idem_ms(v_now) || ':' || octet_length(convert_to(p_codec, 'UTF8')) || ':'
        || p_codec || octet_length(p_value) || ':', 'UTF8') || p_value;
    IF r.step_count = 0 THEN
        v_steps := convert_to('1:', 'UTF8') || v_entry;
    ELSE
        v_steps := convert_to((r.step_count + 1) || ':', 'UTF8')
            || substring(r.steps FROM octet_length(r.step_count::text) + 2) || v_entry;
    END IF;
    UPDATE celery_idem_records SET steps = v_steps, step_count = r.step_count + 1
    WHERE key = p_key;
    RETURN true;
END
$$
-- ;;
-- celery_idem_park: hold the key between an attempt that called self.retry() and its
-- retry (park.lua). The retried message (same task id) may claim it; a duplicate with
-- another task id sees IN_PROGRESS until the hold runs out.
--
-- p_key, p_token   the record and the owning attempt's token
-- p_hold_ms        hold (retry countdown + lease)
-- p_least_ms       least row expiry from now (the claim's longer one is kept)
-- Returns true when parked, false when the token does not own the key (nothing changed).
CREATE OR REPLACE FUNCTION celery_idem_park(
    p_key text, p_token text, p_hold_ms bigint, p_least_ms bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
BEGIN
    o := celery_idem_owned(p_key, p_token);
    r := o.rec; v_now := o.clock;
    IF r IS NULL THEN
        RETURN false;
    END IF;
    UPDATE celery_idem_records
    SET owner = '', deadline = celery_idem_after(v_now, p_hold_ms),
        expires_at = greatest(r.expires_at, celery_idem_after(v_now, p_least_ms))
    WHERE key = p_key;
    RETURN true;
END
$$
-- ;;
-- celery_idem_peek: what a publisher needs to know before sending a task (peek.lua);
-- writes nothing, locks nothing.
--
-- p_key, p_fingerprint   the record, and the arguments fingerprint ('' = not checked)
-- Returns one row (code, fence, task_id, ms_left); code:
--   0  nothing holds the key (absent, free, a lapsed lease or reservation), or it is
--      quarantined (the worker reports that to the caller)
--   2  COMPLETED by task_id
--   3  IN_PROGRESS by task_id, ms_left of its lease (or of its reservation)
--   4  MISMATCH: the key is known with other arguments
CREATE OR REPLACE FUNCTION celery_idem_peek(
    p_key text, p_fingerprint text,
    OUT code integer, OUT fence bigint, OUT task_id text, OUT ms_left bigint)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    r celery_idem_records;
    v_now timestamptz;
BEGIN
    code := 0; fence := 0; task_id := ''; ms_left := 0;
    SELECT * INTO r FROM celery_idem_records WHERE key = p_key;
    v_now := clock_timestamp();
    IF NOT FOUND OR r.expires_at <= v_now OR r.state IN ('F', 'Q')
            OR (r.state = 'R' AND r.deadline <= v_now) THEN
        RETURN;
    END IF;
    fence := r.fence; task_id := r.task_id;
    IF p_fingerprint <> '' AND r.fingerprint <> '' AND r.fingerprint <> p_fingerprint THEN
        code := 4;
    ELSIF r.state IN ('C', 'E', 'X') THEN
        code := 2;
    ELSIF r.deadline > v_now THEN
        code := 3; ms_left := celery_idem_ms(r.deadline) - celery_idem_ms(v_now);
    ELSE
        fence := 0; task_id := '';
    END IF;
END
$$
-- ;;
-- celery_idem_reserve: what a publisher needs before sending a task, and its reservation
-- (reserve.lua). A key nothing holds is reserved for the task id about to be published
-- (state R), so a second send before a worker claims it finds that id. Only a hint to
-- publishers: the worker's claim still decides.
--
-- p_key          the storage key
-- p_task_id      task id the publisher will send the message under
-- p_fingerprint  arguments fingerprint ('' = not checked)
-- p_hold_ms      how long the reservation stands if no worker claims it
-- Returns one row (code, fence, task_id, ms_left); code:
--   0  not reserved, publish anyway: a lapsed lease (the message's claim takes it over
--      and counts it) or a quarantined key (the worker reports that to the caller)
--   6  RESERVED for p_task_id: absent, free, an expired reservation, or already
--      reserved for p_task_id (a client retry); the fence found is kept (a new row's is
--      the clock in ms), the takeover count and the durable steps too
--   2  COMPLETED by task_id
--   3  IN_PROGRESS: held by task_id (ms_left of its lease), or reserved for another
--      task id (ms_left of that reservation)
--   4  MISMATCH: the key is known with other arguments
CREATE OR REPLACE FUNCTION celery_idem_reserve(
    p_key text, p_task_id text, p_fingerprint text, p_hold_ms bigint,
    OUT code integer, OUT fence bigint, OUT task_id text, OUT ms_left bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
    v_now_ms bigint;
    v_state text := 'F';
    v_fence bigint := 0;
    v_takeovers integer := 0;
    v_steps bytea := '';
    v_step_count integer := 0;
    v_expires timestamptz;
    v_fingerprint text := p_fingerprint;
BEGIN
    code := 0; fence := 0; task_id := ''; ms_left := 0;
    o := celery_idem_row(p_key, 'R', '', p_fingerprint, p_task_id, p_hold_ms, p_hold_ms,
                         'celery_idem_reserve');
    r := o.rec; v_now := o.clock; v_now_ms := celery_idem_ms(v_now);
    IF o.inserted THEN
        code := 6; fence := r.fence; task_id := p_task_id;
        RETURN;
    END IF;
    -- An expired row is as absent, but keeps its fence if the clock has not passed it.
    v_fence := greatest(r.fence, v_now_ms);
    v_expires := v_now;
    IF r.expires_at IS NULL OR r.expires_at > v_now THEN
        v_state := r.state;
        v_fence := r.fence;
        v_takeovers := r.takeovers;
        v_steps := r.steps;
        v_step_count := r.step_count;
        v_expires := r.expires_at;
        IF v_state = 'R' AND r.deadline <= v_now THEN
            v_state := 'F';  -- a reservation that ran out holds nothing (fence kept)
        END IF;
        IF v_state = 'Q' THEN
            RETURN;
        END IF;
        fence := r.fence; task_id := r.task_id;
        IF v_state = 'F' AND r.steps <> '' AND p_fingerprint <> '' AND r.fingerprint <> ''
                AND r.fingerprint <> p_fingerprint THEN
            code := 4;  -- a free row's durable steps belong to its request's arguments
            RETURN;
        END IF;
        IF v_state <> 'F' THEN
            IF p_fingerprint <> '' AND r.fingerprint <> ''
                    AND r.fingerprint <> p_fingerprint THEN
                code := 4;
            ELSIF v_state IN ('C', 'E', 'X') THEN
                code := 2;
            ELSIF v_state = 'R' AND r.task_id = p_task_id THEN
                code := 6;
            ELSIF r.deadline > v_now THEN
                code := 3; ms_left := celery_idem_ms(r.deadline) - v_now_ms;
            ELSE
                fence := 0; task_id := '';  -- a lease that ran out: publish anyway
            END IF;
            RETURN;
        END IF;
        IF v_fingerprint = '' AND v_steps <> '' THEN
            v_fingerprint := r.fingerprint;
        END IF;
    ELSE
        v_fingerprint := p_fingerprint;
    END IF;
    -- Absent, free (a tombstone too), or a reservation that ran out.
    UPDATE celery_idem_records
    SET state = 'R', fence = v_fence, deadline = celery_idem_after(v_now, p_hold_ms),
        takeovers = v_takeovers, owner = '', pending = false, fingerprint = v_fingerprint,
        task_id = p_task_id, codec = '', payload = '', steps = v_steps,
        step_count = v_step_count,
        expires_at = greatest(v_expires, celery_idem_after(v_now, p_hold_ms))
    WHERE key = p_key;
    code := 6; fence := v_fence; task_id := p_task_id; ms_left := 0;
END
$$
-- ;;
-- celery_idem_unreserve: withdraw a reservation whose message could not be published
-- (unreserve.lua), so the next send publishes at once.
--
-- p_key, p_task_id   the record and the task id the reservation was made for
-- Returns true when withdrawn: deleted when the clock has passed its fence and it
-- counted no takeover and holds no steps; else free again, keeping its fence and count
-- (a tombstone when it counted no takeover; a plain free row, with its request's
-- fingerprint, when it holds durable steps). False when the row is not that reservation
-- (a worker claimed it, or it ran out and another took it): nothing changed.
CREATE OR REPLACE FUNCTION celery_idem_unreserve(p_key text, p_task_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
BEGIN
    o := celery_idem_live(p_key);
    r := o.rec; v_now := o.clock;
    IF r IS NULL OR r.state <> 'R' OR r.task_id <> p_task_id THEN
        RETURN false;
    END IF;
    IF r.takeovers = 0 AND r.fence < celery_idem_ms(v_now) AND r.steps = '' THEN
        DELETE FROM celery_idem_records WHERE key = p_key;
        RETURN true;
    END IF;
    UPDATE celery_idem_records
    SET state = 'F', owner = '', task_id = '', codec = '', payload = '',
        deadline = CASE WHEN r.steps = '' AND r.takeovers = 0 THEN v_now END,
        fingerprint = CASE WHEN r.steps <> '' THEN r.fingerprint ELSE '' END
    WHERE key = p_key;
    RETURN true;
END
$$
-- ;;
-- celery_idem_forget: forget a record for an operator, unless a live attempt holds it or
-- it changed since the operator looked at it (forget.lua).
--
-- The fence only grows, forget included: a row whose fence the clock has not passed yet
-- becomes a tombstone (state F, same fence, deadline = the time of the forget, nothing
-- else) expiring once the clock has passed the fence (at most a day: a fence further
-- ahead was forged, or the clock went back). Claims take it as any free row; read,
-- summary and this function as absent. Any other row is deleted.
--
-- p_key     the storage key
-- p_fence   the fence the operator saw (NULL = do not compare; 0 = the operator saw a
--           key that is not a record: no row has fence 0, so any row is kept)
-- p_force   forget even while a live attempt, a parked retry or a reservation holds it
-- Returns one row (code, fence), fence 0 when unknown; code (ForgetResult):
--   0  absent (or a tombstone: already forgotten): nothing changed
--   1  forgotten: deleted, or replaced by a tombstone
--   2  held by a live attempt, a parked retry or a reservation, not forced: kept
--   3  its fence is not p_fence any more (another attempt claimed it): kept, even forced
CREATE OR REPLACE FUNCTION celery_idem_forget(
    p_key text, p_fence bigint, p_force boolean, OUT code integer, OUT fence bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o record;
    r celery_idem_records;
    v_now timestamptz;
    v_now_ms bigint;
BEGIN
    code := 0; fence := 0;
    o := celery_idem_live(p_key);
    r := o.rec; v_now := o.clock; v_now_ms := celery_idem_ms(v_now);
    IF r IS NULL OR (r.state = 'F' AND r.deadline IS NOT NULL) THEN
        RETURN;
    END IF;
    fence := r.fence;
    IF p_fence IS NOT NULL AND r.fence <> p_fence THEN
        code := 3;
        RETURN;
    END IF;
    IF r.state IN ('P', 'R') AND r.deadline > v_now AND NOT p_force THEN
        code := 2;
        RETURN;
    END IF;
    code := 1;
    IF r.fence < v_now_ms THEN
        DELETE FROM celery_idem_records WHERE key = p_key;
        RETURN;
    END IF;
    UPDATE celery_idem_records
    SET state = 'F', deadline = v_now, takeovers = 0, owner = '', pending = false,
        fingerprint = '', task_id = '', codec = '', payload = '', steps = '',
        step_count = 0,
        expires_at = celery_idem_after(v_now, least(r.fence - v_now_ms + 1, 86400000))
    WHERE key = p_key;
END
$$
-- ;;
-- celery_idem_read: the record as it stands, for operators (read.lua); writes nothing.
--
-- p_key   the storage key
-- Returns no row when absent, expired or a tombstone; else one row: state, fence,
-- task_id, fingerprint, lease_left_ms (to the deadline of P or R, else NULL; negative
-- once passed), ttl_ms (to the expiry, NULL = never), parked (P with no owner),
-- takeovers, pending, codec, payload, steps, step_count.
CREATE OR REPLACE FUNCTION celery_idem_read(
    p_key text,
    OUT state text, OUT fence bigint, OUT task_id text, OUT fingerprint text,
    OUT lease_left_ms bigint, OUT ttl_ms bigint, OUT parked boolean, OUT takeovers integer,
    OUT pending boolean, OUT codec text, OUT payload bytea, OUT steps bytea,
    OUT step_count integer)
RETURNS SETOF record
LANGUAGE sql STABLE AS $$
    SELECT t.state, t.fence, t.task_id, t.fingerprint,
           CASE WHEN t.state IN ('P', 'R')
                THEN celery_idem_ms(t.deadline) - celery_idem_ms(c.now) END,
           celery_idem_ms(t.expires_at) - celery_idem_ms(c.now),
           t.state = 'P' AND t.owner = '', t.takeovers, t.pending, t.codec, t.payload,
           t.steps, t.step_count
    FROM celery_idem_records t, (SELECT clock_timestamp() AS now) c
    WHERE t.key = p_key AND (t.expires_at IS NULL OR t.expires_at > c.now)
      AND NOT (t.state = 'F' AND t.deadline IS NOT NULL)
$$
-- ;;
-- celery_idem_summary: records without their payload, for listings (summary.lua), for
-- many keys in one round trip; writes nothing.
--
-- p_keys   the storage keys
-- Returns one row per key that holds a record (none for an absent, expired or
-- forgotten one): key, state, fence, task_id, parked, lease_left_ms (as
-- celery_idem_read), ttl_ms, payload_bytes (the result of a completed record, the
-- durable steps of any other), codec, takeovers.
CREATE OR REPLACE FUNCTION celery_idem_summary(
    p_keys text[],
    OUT key text, OUT state text, OUT fence bigint, OUT task_id text, OUT parked boolean,
    OUT lease_left_ms bigint, OUT ttl_ms bigint, OUT payload_bytes integer,
    OUT codec text, OUT takeovers integer)
RETURNS SETOF record
LANGUAGE sql STABLE AS $$
    SELECT t.key, t.state, t.fence, t.task_id, t.state = 'P' AND t.owner = '',
           CASE WHEN t.state IN ('P', 'R')
                THEN celery_idem_ms(t.deadline) - celery_idem_ms(c.now) END,
           celery_idem_ms(t.expires_at) - celery_idem_ms(c.now),
           CASE WHEN t.state IN ('C', 'E', 'X') THEN octet_length(t.payload)
                ELSE octet_length(t.steps) END,
           t.codec, t.takeovers
    FROM celery_idem_records t, (SELECT clock_timestamp() AS now) c
    WHERE t.key = ANY (p_keys) AND (t.expires_at IS NULL OR t.expires_at > c.now)
      AND NOT (t.state = 'F' AND t.deadline IS NOT NULL)
$$
-- ;;
-- celery_idem_sizes: bytes each row takes (pg_column_size of the whole row, its
-- out-of-line payload included, plus its 4-byte line pointer), for `celery idem` memory
-- figures; writes nothing.
--
-- p_keys   the storage keys
-- Returns one row (key, bytes) per key whose row has not expired (a tombstone included:
-- it takes room until it expires).
CREATE OR REPLACE FUNCTION celery_idem_sizes(
    p_keys text[], OUT key text, OUT bytes integer)
RETURNS SETOF record
LANGUAGE sql STABLE AS $$
    SELECT t.key, pg_column_size(t.*) + 4
    FROM celery_idem_records t
    WHERE t.key = ANY (p_keys) AND (t.expires_at IS NULL OR t.expires_at > clock_timestamp())
$$
-- ;;
-- celery_idem_keys: one step of a listing (what SCAN is to Redis): the keys after
-- p_after in byte order, from p_from, below p_below (NULL: no upper bound), at most
-- p_count, skipping expired rows; writes nothing. The caller passes the last key back
-- as p_after until fewer than p_count come, so a key present throughout is listed once.
CREATE OR REPLACE FUNCTION celery_idem_keys(
    p_after text, p_from text, p_below text, p_count integer) RETURNS SETOF text
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    IF p_below IS NULL THEN
        RETURN QUERY
        SELECT t.key::text FROM celery_idem_records t
        WHERE t.key > p_after AND t.key >= p_from
          AND (t.expires_at IS NULL OR t.expires_at > clock_timestamp())
        ORDER BY t.key LIMIT p_count;
    ELSE
        RETURN QUERY
        SELECT t.key::text FROM celery_idem_records t
        WHERE t.key > p_after AND t.key >= p_from AND t.key < p_below
          AND (t.expires_at IS NULL OR t.expires_at > clock_timestamp())
        ORDER BY t.key LIMIT p_count;
    END IF;
END
$$
-- ;;
-- celery_idem_purge: delete up to p_batch rows whose expiry passed, in the caller's
-- (short) transaction; rows another transaction holds are skipped (a claim reusing one).
-- A row whose fence the clock has not passed yet stays until it has (the fence only
-- grows). Returns how many rows were deleted: call again until it returns less than
-- p_batch.
CREATE OR REPLACE FUNCTION celery_idem_purge(p_batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_deleted integer;
BEGIN
    DELETE FROM celery_idem_records
    WHERE key IN (
        SELECT t.key FROM celery_idem_records t
        WHERE t.expires_at <= v_now AND t.fence < celery_idem_ms(v_now)
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED)
      AND expires_at <= v_now;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END
$$
-- ;;
-- The schema's version, last: a database that has it has everything above.
INSERT INTO celery_idem_schema (singleton, version) VALUES (true, 1)
ON CONFLICT (singleton) DO UPDATE
SET version = greatest(celery_idem_schema.version, EXCLUDED.version),
    migrated_at = clock_timestamp()
