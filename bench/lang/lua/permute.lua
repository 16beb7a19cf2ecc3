-- Are-We-Fast-Yet: Permute, transcribed from examples/lang/tests/awfy/permute.lang.
-- All permutations of six elements by swapping; counts the calls of permute (8660).
-- Usage: lua permute.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

local function new_array(n, init)
  local a = {}
  for i = 1, n do a[i] = init end
  return a
end

local function swap(self, i, j)
  local tmp = self.v[i]
  self.v[i] = self.v[j]
  self.v[j] = tmp
end

local function permute(self, n)
  self.count = self.count + 1
  if n ~= 0 then
    local n1 = n - 1
    self:permute(n1)
    -- The lang port's 0-based indices n1 and n1..0 are n and n..1 in a 1-based array.
    local i = n
    while i >= 1 do
      self:swap(n, i)
      self:permute(n1)
      self:swap(n, i)
      i = i - 1
    end
  end
end

local function new_permute()
  return {count = 0, v = nil, permute = permute, swap = swap}
end

local function benchmark(self)
  self.count = 0
  self.v = new_array(6, 0)
  self:permute(6)
  return self.count
end

local function verify(result) return result == 8660 end

local bench = new_permute()
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
