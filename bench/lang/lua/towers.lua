-- Are-We-Fast-Yet: Towers, transcribed from examples/lang/tests/awfy/towers.lang.
-- Towers of Hanoi with 13 disks kept as linked lists on three piles; counts the moves
-- (8191). Usage: lua towers.lua [ITERATIONS]
local iterations = tonumber(arg and arg[1]) or 1

-- The lang port prints -code and stops; here error() stops the program (exit code 1).
local function fail(code)
  print(-code)
  error("towers: impossible move")
end

local function new_disk(size) return {size = size, next = nil} end

-- Piles are numbered 1..3 here (0..2 in the lang port), as Lua arrays are 1-based.
local function push_disk(self, disk, pile)
  local top = self.piles[pile]
  if top ~= nil and disk.size >= top.size then
    fail(1) -- cannot put a big disk on a smaller one
  end
  disk.next = top
  self.piles[pile] = disk
end

local function pop_disk_from(self, pile)
  local top = self.piles[pile]
  if top == nil then
    fail(2) -- attempt to remove a disk from an empty pile
  end
  self.piles[pile] = top.next
  top.next = nil
  return top
end

local function move_top_disk(self, from_pile, to_pile)
  self:push_disk(self:pop_disk_from(from_pile), to_pile)
  self.moves_done = self.moves_done + 1
end

local function build_tower_at(self, pile, disks)
  local i = disks
  while i >= 0 do
    self:push_disk(new_disk(i), pile)
    i = i - 1
  end
end

local function move_disks(self, disks, from_pile, to_pile)
  if disks == 1 then
    self:move_top_disk(from_pile, to_pile)
  else
    local other_pile = 6 - from_pile - to_pile
    self:move_disks(disks - 1, from_pile, other_pile)
    self:move_top_disk(from_pile, to_pile)
    self:move_disks(disks - 1, other_pile, to_pile)
  end
end

local function new_towers()
  return {piles = nil, moves_done = 0,
          push_disk = push_disk, pop_disk_from = pop_disk_from, move_top_disk = move_top_disk,
          build_tower_at = build_tower_at, move_disks = move_disks}
end

local function benchmark(self)
  -- array(3): three empty piles (nil elements: an empty table in Lua)
  self.piles = {}
  self:build_tower_at(1, 13)
  self.moves_done = 0
  self:move_disks(13, 1, 2)
  return self.moves_done
end

local function verify(result) return result == 8191 end

local bench = new_towers()
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
