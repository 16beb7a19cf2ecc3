-- Are-We-Fast-Yet: Sieve, transcribed from examples/lang/tests/awfy/sieve.lang.
-- Counts the primes up to 5000 with a boolean array. Usage: lua sieve.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

local function new_array(n, init)
  local a = {}
  for i = 1, n do a[i] = init end
  return a
end

-- The lang port's flags[i - 1] (0-based) is flags[i] in a 1-based array.
local function sieve(flags, size)
  local prime_count = 0
  local i = 2
  while i <= size do
    if flags[i] then
      prime_count = prime_count + 1
      local k = i + i
      while k <= size do
        flags[k] = false
        k = k + i
      end
    end
    i = i + 1
  end
  return prime_count
end

local function benchmark()
  local flags = new_array(5000, true)
  return sieve(flags, 5000)
end

local function verify(result) return result == 669 end

local run = 0
local last = 0
local ok = true
while run < iterations do
  last = benchmark()
  ok = ok and verify(last)
  run = run + 1
end
print(last)
print(ok and 1 or 0)
