//! The Lua scripts that make each settlement one atomic step on the server.

use std::sync::LazyLock;

use redis::Script;

/// Acknowledges and deletes an entry. Returns 1, or 0 if the entry was no
/// longer pending (its lease was lost and another consumer took it).
///
/// KEYS: stream. ARGV: group, id.
pub(crate) static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if n == 1 then redis.call('XDEL', KEYS[1], ARGV[2]) end
return n
",
    )
});

/// Acknowledges and deletes a batch of entries of one stream, each as in
/// [`ACK`]. Returns one 1 or 0 per entry, in order.
///
/// KEYS: stream. ARGV: group, ids.
pub(crate) static ACK_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
local acked = {}
for i = 2, #ARGV do
  local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  out[i - 1] = n
  if n == 1 then acked[#acked + 1] = ARGV[i] end
end
if #acked > 0 then redis.call('XDEL', KEYS[1], unpack(acked)) end
return out
",
    )
});

/// Takes a pending entry out of its stream and puts a copy elsewhere, in
/// one step: back into a stream (`s`), into a delayed set (`z`, due after
/// ARGV[6] ms of server time), or nowhere (`x`). Returns 1, or 0 if the
/// entry was no longer pending.
///
/// KEYS: source stream, destination. ARGV: group, id, mode, blob,
/// attempts, delay ms, priority, token.
pub(crate) static MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] == 's' then
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[4], 'a', ARGV[5])
elseif ARGV[3] == 'z' then
  local t = redis.call('TIME')
  local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[6])
  redis.call('ZADD', KEYS[2], due, ARGV[7] .. '|' .. ARGV[5] .. '|' .. ARGV[8] .. '|' .. ARGV[4])
end
return 1
",
    )
});

/// Moves the delayed entries that are due into their priority streams.
/// Returns `{moved, ms until the next is due or -1}`.
///
/// KEYS: delayed set. ARGV: stream key prefix (the priority digit follows), limit.
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local p, a, blob = string.match(m, '^(%d)|(%d+)|%x+|(.*)$')
  if p then redis.call('XADD', ARGV[1] .. p, '*', 'm', blob, 'a', a) end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {#due, math.max(0, tonumber(nxt[2]) - now)} end
return {#due, -1}
",
    )
});

/// Reads up to ARGV[3] new entries from the priority streams, highest first.
/// Returns `{{stream, id, {field, value, ...}}, ...}`.
///
/// KEYS: streams, highest priority first. ARGV: group, consumer, count.
pub(crate) static READ_BY_PRIORITY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local want = tonumber(ARGV[3])
local out = {}
for _, key in ipairs(KEYS) do
  if want <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', key, '>')
  if r then
    for _, e in ipairs(r[1][2]) do
      table.insert(out, {key, e[1], e[2]})
      want = want - 1
    end
  end
end
return out
",
    )
});
