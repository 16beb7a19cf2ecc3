-- Are-We-Fast-Yet: Storage, transcribed from examples/lang/tests/awfy/storage.lang.
-- Builds a tree of arrays of depth 7 (four children per inner node, leaves of 1 to 10
-- elements); counts the nodes built (5461). Usage: lua storage.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

-- The lang port's array(n) is n nils. A Lua table cannot hold nil elements, so the
-- leaves hold false: the table really has n array slots, as the lang array has.
local function new_array(n, init)
  local a = {}
  for i = 1, n do a[i] = init end
  return a
end

local function random_next(self)
  self.seed = (self.seed * 1309 + 13849) % 65536
  return self.seed
end
local function new_random() return {seed = 74755, next = random_next} end

local function build_tree_depth(self, depth, random)
  self.count = self.count + 1
  if depth == 1 then
    return new_array(random:next() % 10 + 1, false)
  end
  local arr = new_array(4, false)
  local i = 1
  while i <= 4 do
    arr[i] = self:build_tree_depth(depth - 1, random)
    i = i + 1
  end
  return arr
end

local function new_storage() return {count = 0, build_tree_depth = build_tree_depth} end

local function benchmark(self)
  local random = new_random()
  self.count = 0
  self:build_tree_depth(7, random)
  return self.count
end

local function verify(result) return result == 5461 end

local bench = new_storage()
local run = 0
local last = 0
local ok = true
while run < iterations do
  last = benchmark(bench)
  ok = ok and verify(last)
  run = run + 1
end
print(last)
print(ok and 1 or 0)
