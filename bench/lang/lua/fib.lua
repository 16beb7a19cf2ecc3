-- Fib: recursive Fibonacci, transcribed from examples/lang/tests/awfy/fib.lang.
-- Each run computes fib(27) = 196418. Usage: lua fib.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

local function fib(n)
  if n < 2 then return n end
  return fib(n - 1) + fib(n - 2)
end

local function benchmark() return fib(27) end

local function verify(result) return result == 196418 end

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
