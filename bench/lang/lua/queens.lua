-- Are-We-Fast-Yet: Queens, transcribed from examples/lang/tests/awfy/queens.lang.
-- Solves the eight queens problem ten times by backtracking over three boolean arrays.
-- Usage: lua queens.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

local function new_array(n, init)
  local a = {}
  for i = 1, n do a[i] = init end
  return a
end

-- Rows and columns are 1..8 here (0..7 in the lang port), so the diagonal indices
-- c + r and c - r + 7 become c + r (2..16) and c - r + 8 (1..15) of 16-element arrays.
local function get_row_column(self, r, c)
  return self.free_rows[r] and self.free_maxs[c + r] and self.free_mins[c - r + 8]
end

local function set_row_column(self, r, c, v)
  self.free_rows[r] = v
  self.free_maxs[c + r] = v
  self.free_mins[c - r + 8] = v
end

local function place_queen(self, c)
  local r = 1
  while r <= 8 do
    if self:get_row_column(r, c) then
      self.queen_rows[r] = c
      self:set_row_column(r, c, false)
      if c == 8 then return true end
      if self:place_queen(c + 1) then return true end
      self:set_row_column(r, c, true)
    end
    r = r + 1
  end
  return false
end

local queens

local function new_queens()
  return {free_rows = nil, free_maxs = nil, free_mins = nil, queen_rows = nil,
          queens = queens, place_queen = place_queen,
          get_row_column = get_row_column, set_row_column = set_row_column}
end

queens = function(self)
  self.free_rows = new_array(8, true)
  self.free_maxs = new_array(16, true)
  self.free_mins = new_array(16, true)
  self.queen_rows = new_array(8, -1)
  return self:place_queen(1)
end

local function benchmark(self)
  local result = true
  local i = 0
  while i < 10 do
    result = result and self:queens()
    i = i + 1
  end
  return result
end

local function verify(result) return result == true end

local bench = new_queens()
local run = 0
local last = 0
local ok = true
while run < iterations do
  last = benchmark(bench)
  ok = ok and verify(last)
  run = run + 1
end
print(last and 1 or 0)
print(ok and 1 or 0)
