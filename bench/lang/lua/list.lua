-- Are-We-Fast-Yet: List, transcribed from examples/lang/tests/awfy/list.lang.
-- Takeuchi-style recursion over linked lists of lengths 15, 10 and 6; the result has
-- length 10. Usage: lua list.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

local function element_length(self)
  if self.next == nil then return 1 end
  return 1 + self.next:length()
end

local function new_element(v) return {val = v, next = nil, length = element_length} end

local function make_list(length)
  if length == 0 then return nil end
  local e = new_element(length)
  e.next = make_list(length - 1)
  return e
end

local function is_shorter_than(x, y)
  local x_tail = x
  local y_tail = y
  while y_tail ~= nil do
    if x_tail == nil then return true end
    x_tail = x_tail.next
    y_tail = y_tail.next
  end
  return false
end

local function tail(x, y, z)
  if is_shorter_than(y, x) then
    return tail(tail(x.next, y, z), tail(y.next, z, x), tail(z.next, x, y))
  end
  return z
end

local function benchmark()
  local result = tail(make_list(15), make_list(10), make_list(6))
  return result:length()
end

local function verify(result) return result == 10 end

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
